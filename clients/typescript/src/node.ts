/**
 * The Node-only parts: saving stems to disk, and running the webhook handler under
 * Express or `node:http`.
 */

import { randomBytes } from "node:crypto";
import { createWriteStream } from "node:fs";
import { mkdir, open, rename, rm } from "node:fs/promises";
import type { IncomingMessage, ServerResponse } from "node:http";
import { basename, join } from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import type { ReadableStream as WebReadableStream } from "node:stream/web";

import { type FetchStemOptions, type Stems, StemFetchError, StemsepError, fetchStem } from "./index.js";

export * from "./index.js";

function extension(url: string): string {
  if (url.startsWith("data:")) {
    const mime = url.slice(5).split(/[;,]/, 1)[0]!.toLowerCase();
    const known: Record<string, string> = {
      "audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/flac": "flac",
      "audio/x-flac": "flac", "audio/mpeg": "mp3", "audio/ogg": "ogg",
    };
    return known[mime] ?? "bin";
  }
  let path = url;
  try {
    path = new URL(url).pathname;
  } catch {
    // not absolute: use as is
  }
  const ext = /\.([A-Za-z0-9]{1,8})$/.exec(path)?.[1]?.toLowerCase();
  return ext ?? "bin";
}

async function syncFolder(directory: string): Promise<void> {
  try {
    const handle = await open(directory, "r");
    try {
      await handle.sync();
    } finally {
      await handle.close();
    }
  } catch {
    // a file system that cannot sync folders is let be
  }
}

export interface DownloadOptions extends FetchStemOptions {
  /** File name prefix: files are `<name>_<stem>.<ext>` (`<stem>.<ext>` without one). */
  name?: string;
}

/**
 * Download each stem to `directory`, all at once. Each file is written to a hidden
 * `.<file>.<random>.part` beside it, flushed, then renamed: a file is either absent or
 * complete. Resolves to `{stem: path}`; rejects with a `StemFetchError` naming the stem
 * and URL that failed (the other stems are still saved).
 */
export async function downloadStems(stems: Stems, directory: string, options: DownloadOptions = {}): Promise<Record<string, string>> {
  await mkdir(directory, { recursive: true });
  const entries = Object.entries(stems);
  const results = await Promise.allSettled(
    entries.map(async ([stem, url]) => {
      const file = `${options.name ? `${options.name}_` : ""}${stem}.${extension(url)}`;
      const dest = join(directory, file);
      const response = await fetchStem(stem, url, options);
      const tmp = join(directory, `.${basename(file)}.${randomBytes(4).toString("hex")}.part`);
      try {
        if (!response.body) throw new Error("empty response");
        await pipeline(Readable.fromWeb(response.body as WebReadableStream), createWriteStream(tmp, { flags: "wx" }));
        const handle = await open(tmp, "r+");
        try {
          await handle.sync();
        } finally {
          await handle.close();
        }
        await rename(tmp, dest);
      } catch (err) {
        await rm(tmp, { force: true });
        if (err instanceof StemsepError) throw err;
        throw new StemFetchError(stem, url, response.status, `the download broke off: ${(err as Error).message}`);
      }
      return [stem, dest] as const;
    }),
  );
  await syncFolder(directory);
  const failures = results.flatMap((r) => (r.status === "rejected" ? [r.reason as Error] : []));
  if (failures.length === 1) throw failures[0];
  if (failures.length > 1) throw new StemsepError(failures.map((e) => e.message).join("; "));
  return Object.fromEntries(results.map((r) => (r as PromiseFulfilledResult<readonly [string, string]>).value));
}

type FetchHandler = (request: Request) => Promise<Response>;

/** A request as Express hands it over: `body` is set when a body parser ran before the route. */
type NodeRequest = IncomingMessage & { body?: unknown };

/**
 * Run a Fetch API handler (e.g. `createWebhookHandler(...)`) as a `node:http` / Express
 * handler. The signature covers the exact bytes Replicate sent, so the route must see the
 * raw body: mount it before `express.json()`, or give it `express.raw({ type: "*\/*" })`.
 * A body that a JSON parser already turned into an object is refused with a 500 that says so.
 */
export function toNodeHandler(handler: FetchHandler): (req: NodeRequest, res: ServerResponse) => Promise<void> {
  return async (req, res) => {
    let response: Response;
    try {
      response = await handler(await toRequest(req));
    } catch (err) {
      const message = (err as Error).message ?? String(err);
      response = new Response(JSON.stringify({ error: message }), {
        status: 500,
        headers: { "content-type": "application/json" },
      });
      if (!(err instanceof StemsepError)) console.error(`stemsep webhook adapter: ${message}`);
    }
    res.statusCode = response.status;
    response.headers.forEach((value, key) => res.setHeader(key, value));
    res.end(Buffer.from(await response.arrayBuffer()));
  };
}

async function toRequest(req: NodeRequest): Promise<Request> {
  const headers = new Headers();
  for (const [key, value] of Object.entries(req.headers)) {
    if (Array.isArray(value)) value.forEach((v) => headers.append(key, v));
    else if (value !== undefined) headers.set(key, value);
  }
  const url = `http://${req.headers.host ?? "localhost"}${req.url ?? "/"}`;
  const method = req.method ?? "GET";
  if (method === "GET" || method === "HEAD") return new Request(url, { method, headers });
  let body: Uint8Array;
  if (Buffer.isBuffer(req.body) || req.body instanceof Uint8Array) {
    body = req.body;
  } else if (typeof req.body === "string") {
    body = Buffer.from(req.body);
  } else if (req.body !== undefined && req.readableEnded) {
    throw new StemsepError(
      "the request body was already parsed (express.json()?), so its signature cannot be checked: " +
        "mount the webhook route before express.json() or give it express.raw({ type: \"*/*\" })",
    );
  } else {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    body = Buffer.concat(chunks);
  }
  return new Request(url, { method, headers, body: new Uint8Array(body) });
}
