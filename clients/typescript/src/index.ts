/**
 * Call the stemsep model on Replicate from JavaScript: run it and get the stems' URLs,
 * submit it with a webhook, and receive that webhook safely.
 *
 * Everything here runs on any runtime with the Fetch API (Node 20, Next.js route handlers,
 * Cloudflare Workers, Deno); `stemsep-replicate/node` adds the Node-only parts (saving
 * stems to disk, an adapter for Express and `node:http`).
 */

import Replicate from "replicate";
import type { Prediction } from "replicate";
import { Webhook } from "standardwebhooks";

import { PredictionError, StemFetchError, StemsepError } from "./errors.js";
import { type Inputs, type Stems, type TerminalStatus, isTerminal, stemsFromOutput } from "./outputs.js";

export * from "./errors.js";
export * from "./outputs.js";

/** A song to separate: a URL, or bytes for the client to upload (up to 100 MB). */
export type Audio = string | URL | Blob | ArrayBuffer | Uint8Array;

// settings ----------------------------------------------------------------------------------

/** How to reach Replicate; every field is optional. */
export interface ClientOptions {
  /**
   * The Replicate model: `owner/name` (its latest version) or `owner/name:version`; default
   * `$REPLICATE_MODEL`. The model's own `model` input (which of its models runs) goes in `input`.
   */
  model?: string;
  /** A client of your own (either `useFileOutput` setting works). Overrides auth/baseUrl/fetch. */
  replicate?: Replicate;
  /** API token; default `$REPLICATE_API_TOKEN`. */
  auth?: string;
  /** Default `https://api.replicate.com/v1`. */
  baseUrl?: string;
  /** A Fetch API implementation; default `globalThis.fetch`. */
  fetch?: typeof fetch;
}

function env(name: string): string | undefined {
  const proc = (globalThis as { process?: { env?: Record<string, string | undefined> } }).process;
  return proc?.env?.[name] || undefined;
}

type ModelRef = `${string}/${string}` | `${string}/${string}:${string}`;

/** The model reference, checked: `owner/name` or `owner/name:version`. */
export function resolveModel(model?: string): ModelRef {
  const ref = model || env("REPLICATE_MODEL");
  if (!ref) {
    throw new StemsepError(
      "no Replicate model given: pass `model` as owner/name (e.g. ryansmith/bs-roformer) or set REPLICATE_MODEL",
    );
  }
  if (!/^[^/:\s]+\/[^/:\s]+(:[0-9a-zA-Z]+)?$/.test(ref)) {
    throw new StemsepError(`Replicate model ${JSON.stringify(ref)} is not of the form owner/name or owner/name:version`);
  }
  return ref as ModelRef;
}

/**
 * The client to call Replicate with. One made here returns plain URL strings
 * (`useFileOutput: false`): replicate >= 1.0's `FileOutput` objects start downloading their
 * file the moment `run()` returns and buffer all of it in memory, which a caller that only
 * wants the URLs never asked for.
 */
export function makeClient(options: ClientOptions = {}): Replicate {
  if (options.replicate) return options.replicate;
  const auth = options.auth || env("REPLICATE_API_TOKEN");
  if (!auth) {
    throw new StemsepError(
      "no Replicate API token: pass `auth` or set REPLICATE_API_TOKEN (https://replicate.com/account/api-tokens)",
    );
  }
  return new Replicate({
    auth,
    baseUrl: options.baseUrl,
    fetch: options.fetch,
    useFileOutput: false,
    userAgent: "stemsep-replicate/0.1.0",
  });
}

// outputs -----------------------------------------------------------------------------------

/** Stop the downloads that `FileOutput` objects start on their own, and ignore their errors. */
function releaseFileOutputs(output: unknown): void {
  const items = Array.isArray(output) ? output : output && typeof output === "object" ? Object.values(output) : [];
  for (const item of items) {
    if (item instanceof ReadableStream && !item.locked) {
      item.cancel().catch(() => {});
    }
  }
}

// calls -------------------------------------------------------------------------------------

function audioInput(audio: Audio): string | Blob {
  if (typeof audio === "string") return audio;
  if (audio instanceof URL) return audio.href;
  if (audio instanceof Blob) return audio;
  if (audio instanceof ArrayBuffer || ArrayBuffer.isView(audio)) return new Blob([audio as BlobPart]);
  throw new StemsepError(`audio must be a URL or bytes (Blob, ArrayBuffer, Uint8Array), not ${typeof audio}`);
}

/** A one-sentence description of an error from the replicate client. */
export function describeError(err: unknown): string {
  const response = (err as { response?: Response } | null)?.response;
  const message = err instanceof Error ? err.message : String(err);
  if (response && typeof response.status === "number") {
    // ApiError: "Request to <url> failed with status 422 Unprocessable Entity: {json}."
    const body = message.slice(message.indexOf(": ") + 2).replace(/\.$/, "");
    let detail = body;
    try {
      const parsed = JSON.parse(body) as { detail?: unknown; title?: unknown };
      detail = String(parsed.detail ?? parsed.title ?? body);
    } catch {
      // not JSON: keep the text
    }
    return `HTTP ${response.status}: ${detail || response.statusText}`;
  }
  const cause = (err as { cause?: { code?: string; message?: string } } | null)?.cause;
  return cause?.code || cause?.message ? `${message} (${cause.code ?? cause.message})` : message;
}

export interface SeparateOptions extends ClientOptions {
  /** The model inputs but `audio`, whatever their names, e.g. `{ model: "karaoke", output_format: "flac" }`. */
  input?: Record<string, unknown>;
  /** Abort the wait (the prediction is then canceled by the replicate client). */
  signal?: AbortSignal;
  /** Milliseconds between status polls once Replicate's blocking wait has run out (default 1000). */
  pollInterval?: number;
}

/**
 * Run the model on `audio` with `replicate.run` and wait for it. Returns the output URLs
 * by stem (`stemsFromOutput`): `{ vocals, instrumental }` for the default model, every
 * stem returned for another (`input: { model: "karaoke" }`) or for a choice of stems
 * (`input: { stems: "instrumental" }`). Replicate deletes them an
 * hour after the prediction ends: fetch them soon (`fetchStem`, or `downloadStems` from
 * `stemsep-replicate/node`).
 */
export async function separate(audio: Audio, options: SeparateOptions = {}): Promise<Stems> {
  const model = resolveModel(options.model);
  const client = makeClient(options);
  const input = { ...options.input, audio: audioInput(audio) };
  let last: Prediction | undefined;
  let output: unknown;
  try {
    output = await client.run(model, { input, signal: options.signal }, (prediction) => {
      last = prediction;
    });
  } catch (err) {
    const id = last?.id ?? null;
    if (last && last.status === "failed") {
      throw new PredictionError(`prediction ${id} failed: ${last.error ?? "no error message"}`, id, "failed");
    }
    const failed = /^Prediction failed: ([\s\S]*)$/.exec(err instanceof Error ? err.message : "");
    if (id && failed) {
      throw new PredictionError(`prediction ${id} failed: ${failed[1]}`, id, "failed");
    }
    if (id) {
      throw new PredictionError(`prediction ${id}: ${describeError(err)}`, id, last?.status ?? null);
    }
    throw new PredictionError(`Replicate refused to create a prediction: ${describeError(err)}`);
  }
  releaseFileOutputs(output);
  // replicate.run treats any status but "starting" after its blocking request as finished,
  // so a song still "processing" when the wait runs out comes back with no output: poll on.
  if (last && !isTerminal(last.status)) {
    last = await poll(client, last, options.pollInterval ?? 1000, options.signal);
    output = last.output;
  }
  if (last && last.status !== "succeeded") {
    const reason = last.error ? String(last.error) : "no error message";
    throw new PredictionError(`prediction ${last.id} ${last.status}: ${reason}`, last.id, last.status);
  }
  return stemsFromOutput(output, options.input);
}

async function poll(client: Replicate, prediction: Prediction, interval: number, signal?: AbortSignal) {
  let current = prediction;
  while (!isTerminal(current.status)) {
    if (signal?.aborted) {
      throw new PredictionError(`prediction ${current.id}: aborted while waiting`, current.id, current.status);
    }
    await new Promise((resolve) => setTimeout(resolve, interval));
    try {
      current = await client.predictions.get(current.id);
    } catch (err) {
      throw new PredictionError(`prediction ${current.id}: could not poll it: ${describeError(err)}`, current.id);
    }
  }
  return current;
}

export interface SubmitOptions extends ClientOptions {
  /** The model inputs but `audio`, whatever their names, e.g. `{ model: "karaoke" }`. */
  input?: Record<string, unknown>;
  signal?: AbortSignal;
}

/**
 * Start a prediction on `audio` and return its id without waiting. Replicate POSTs the
 * finished prediction (whatever its terminal status) to `webhookUrl`; receive it with
 * `createWebhookHandler`.
 */
export async function submit(audio: Audio, webhookUrl: string | URL, options: SubmitOptions = {}): Promise<string> {
  const webhook = String(webhookUrl);
  if (!/^https?:\/\//.test(webhook)) {
    throw new StemsepError(`webhook URL ${JSON.stringify(webhook)} is not an http(s) URL`);
  }
  const model = resolveModel(options.model);
  const client = makeClient(options);
  const [ref = "", version] = model.split(":");
  try {
    const prediction = await client.predictions.create({
      ...(version ? { version } : { model: ref }),
      input: { ...options.input, audio: audioInput(audio) },
      webhook,
      webhook_events_filter: ["completed"],
      signal: options.signal,
    });
    return prediction.id;
  } catch (err) {
    throw new PredictionError(`Replicate refused to create a prediction: ${describeError(err)}`);
  }
}

// fetching a stem ---------------------------------------------------------------------------

export interface FetchStemOptions {
  fetch?: typeof fetch;
  signal?: AbortSignal;
  /** Tries in all for 429, 5xx and network errors (default 4). */
  attempts?: number;
  /** Milliseconds before the first retry, doubled each time (default 500). */
  backoff?: number;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * GET one stem's URL and return the response, ready to stream. A missing file (404, 410:
 * Replicate deletes outputs an hour after the prediction ends) or other refusal is a
 * `StemFetchError` naming the stem and the URL; 429, 5xx and network errors are retried.
 */
export async function fetchStem(stem: string, url: string, options: FetchStemOptions = {}): Promise<Response> {
  const doFetch = options.fetch ?? globalThis.fetch;
  const attempts = Math.max(1, options.attempts ?? 4);
  const backoff = options.backoff ?? 500;
  let last = "no attempt made";
  let lastStatus: number | null = null;
  for (let attempt = 0; attempt < attempts; attempt++) {
    if (attempt) await sleep(backoff * 2 ** (attempt - 1));
    let response: Response;
    try {
      response = await doFetch(url, { signal: options.signal });
    } catch (err) {
      if (options.signal?.aborted) throw new StemFetchError(stem, url, null, "aborted");
      last = describeError(err);
      continue;
    }
    if (response.ok) return response;
    await response.body?.cancel().catch(() => {});
    lastStatus = response.status;
    last = `HTTP ${response.status}${response.statusText ? ` ${response.statusText}` : ""}`;
    if (response.status === 404 || response.status === 410) {
      throw new StemFetchError(stem, url, response.status, `${last} (Replicate deletes outputs an hour after the prediction ends)`);
    }
    if (response.status !== 429 && response.status !== 408 && response.status < 500) {
      throw new StemFetchError(stem, url, response.status, last);
    }
  }
  throw new StemFetchError(stem, url, lastStatus, `${last} after ${attempts} attempts`);
}

// webhooks ----------------------------------------------------------------------------------

/** A finished prediction, as handed to your callbacks. */
export interface CompletedPrediction {
  /** The prediction id. */
  id: string;
  status: TerminalStatus;
  /** `{stem: url}` (named by `stemsFromOutput`) for a succeeded prediction, `null` otherwise. */
  stems: Stems | null;
  /** The prediction's error (failed), else `null`. */
  error: string | null;
  /** Seconds of billed model time (`metrics.predict_time`), when Replicate reports it. */
  predictTime: number | null;
  /** The `webhook-id` of the delivery (the idempotency key). */
  webhookId: string;
  /** The prediction object as delivered. */
  prediction: Prediction;
}

type Outcome = "new" | "processing" | "done";

/**
 * Remembers which deliveries were handled, so that Replicate's retries of one delivery
 * (same `webhook-id`) are processed once. Use a shared store (Redis, a database, KV)
 * wherever more than one process or serverless instance receives webhooks.
 */
export interface DedupeStore {
  /** Atomically: `"new"` (and mark it processing) if `id` is unseen, else its state. */
  begin(id: string): Outcome | Promise<Outcome>;
  /** Processing of `id` succeeded: answer later deliveries with "duplicate". */
  finish(id: string): void | Promise<void>;
  /** Processing of `id` failed: forget it, so that Replicate's retry is processed. */
  abort(id: string): void | Promise<void>;
}

/**
 * A process-local `DedupeStore`. Entries are kept for `ttlMs` (default 24 h); a
 * "processing" mark left by a crashed handler lapses after `leaseMs` (default 10 min).
 */
export class MemoryDedupeStore implements DedupeStore {
  private readonly entries = new Map<string, { state: "processing" | "done"; until: number }>();
  private readonly ttlMs: number;
  private readonly leaseMs: number;
  private readonly maxEntries: number;

  constructor(options: { ttlMs?: number; leaseMs?: number; maxEntries?: number } = {}) {
    this.ttlMs = options.ttlMs ?? 24 * 3600_000;
    this.leaseMs = options.leaseMs ?? 10 * 60_000;
    this.maxEntries = options.maxEntries ?? 100_000;
  }

  begin(id: string): Outcome {
    const now = Date.now();
    const entry = this.entries.get(id);
    if (entry && entry.until > now) return entry.state;
    this.entries.delete(id);
    if (this.entries.size >= this.maxEntries) {
      for (const [key, value] of this.entries) if (value.until <= now) this.entries.delete(key);
      for (const key of this.entries.keys()) {
        if (this.entries.size < this.maxEntries) break;
        this.entries.delete(key); // the oldest first
      }
    }
    this.entries.set(id, { state: "processing", until: now + this.leaseMs });
    return "new";
  }

  finish(id: string): void {
    this.entries.set(id, { state: "done", until: Date.now() + this.ttlMs });
  }

  abort(id: string): void {
    this.entries.delete(id);
  }
}

export interface WebhookHandlerOptions {
  /** The signing secret (`whsec_...`) from `replicate.webhooks.default.secret.get()`, or a function returning it. */
  secret: string | (() => string | Promise<string>);
  /**
   * Called once per finished prediction. Gets failed and canceled ones too (with their
   * `status` and `error`) unless `onFailure` is given. Throwing makes the handler answer
   * 500, so Replicate delivers again later.
   */
  onCompleted: (prediction: CompletedPrediction) => unknown | Promise<unknown>;
  /** Called instead of `onCompleted` for failed, canceled and aborted predictions. */
  onFailure?: (prediction: CompletedPrediction) => unknown | Promise<unknown>;
  /** Where handled `webhook-id`s are kept (default: a `MemoryDedupeStore`). */
  store?: DedupeStore;
  /** Told about every error answered with 5xx (default: one line on `console.error`). */
  onError?: (error: Error, context: { webhookId: string | null; predictionId: string | null }) => void;
}

function json(status: number, body: Record<string, unknown>): Response {
  return new Response(JSON.stringify(body), { status, headers: { "content-type": "application/json" } });
}

function asError(err: unknown): Error {
  return err instanceof Error ? err : new Error(String(err));
}

/**
 * A handler for Replicate's signed webhook: give it a Fetch API `Request`, get a `Response`.
 *
 * - 401 for a delivery without the three `webhook-*` headers, with a signature that does not
 *   match the body, or with a timestamp more than 5 minutes off (a replay);
 * - 200 `{"duplicate": true}` for a `webhook-id` already handled; 409 while the same id is
 *   being handled (Replicate retries later);
 * - 200 `{"ignored": ...}` for a non-terminal event (`start`, `output`, `logs`);
 * - otherwise your callback runs; 200 when it returns, 500 (reported to `onError`) when it throws.
 */
export function createWebhookHandler(options: WebhookHandlerOptions): (request: Request) => Promise<Response> {
  const store = options.store ?? new MemoryDedupeStore();
  const report =
    options.onError ??
    ((error: Error, context: { webhookId: string | null; predictionId: string | null }) => {
      console.error(`stemsep webhook ${context.webhookId ?? "-"} (prediction ${context.predictionId ?? "-"}): ${error.message}`);
    });

  return async function handleWebhook(request: Request): Promise<Response> {
    if (request.method !== "POST") return json(405, { error: "use POST" });
    const body = await request.text();
    const headers = {
      "webhook-id": request.headers.get("webhook-id") ?? "",
      "webhook-timestamp": request.headers.get("webhook-timestamp") ?? "",
      "webhook-signature": request.headers.get("webhook-signature") ?? "",
    };
    if (!headers["webhook-id"] || !headers["webhook-timestamp"] || !headers["webhook-signature"]) {
      return json(401, { error: "unsigned: the webhook-id, webhook-timestamp and webhook-signature headers are required" });
    }
    const webhookId = headers["webhook-id"];
    let verifier: Webhook;
    try {
      const secret = typeof options.secret === "function" ? await options.secret() : options.secret;
      verifier = new Webhook(secret);
    } catch (err) {
      const error = new StemsepError(`the webhook signing secret is unusable (expected whsec_<base64>): ${asError(err).message}`);
      report(error, { webhookId, predictionId: null });
      return json(500, { error: error.message });
    }
    let payload: unknown;
    try {
      payload = verifier.verify(body, headers); // signature, then timestamp within 5 minutes
    } catch (err) {
      return json(401, { error: `bad signature: ${asError(err).message}` });
    }
    const prediction = payload as Prediction | null;
    if (!prediction || typeof prediction !== "object" || typeof prediction.id !== "string" || typeof prediction.status !== "string") {
      return json(400, { error: "the body is not a prediction object" });
    }
    if (!isTerminal(prediction.status)) {
      return json(200, { ignored: `status ${prediction.status}` });
    }
    const context = { webhookId, predictionId: prediction.id };
    let state: Outcome;
    try {
      state = await store.begin(webhookId);
    } catch (err) {
      report(asError(err), context);
      return json(500, { error: `dedupe store: ${asError(err).message}` });
    }
    if (state === "done") return json(200, { duplicate: true });
    if (state === "processing") return json(409, { error: "this delivery is being handled; retry later" });

    try {
      const status = prediction.status;
      const event: CompletedPrediction = {
        id: prediction.id,
        status,
        stems: status === "succeeded" ? stemsFromOutput(prediction.output, prediction.input as Inputs) : null,
        error: prediction.error == null ? null : String(prediction.error),
        predictTime: typeof prediction.metrics?.predict_time === "number" ? prediction.metrics.predict_time : null,
        webhookId,
        prediction,
      };
      const callback = status !== "succeeded" && options.onFailure ? options.onFailure : options.onCompleted;
      await callback(event);
    } catch (err) {
      await Promise.resolve(store.abort(webhookId)).catch(() => {});
      const error = asError(err);
      report(error, context);
      return json(500, { error: error.message.split("\n", 1)[0] });
    }
    try {
      await store.finish(webhookId);
    } catch (err) {
      report(asError(err), context); // handled already: still a success for Replicate
    }
    return json(200, { ok: true });
  };
}
