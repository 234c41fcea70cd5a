// A local stand-in for Replicate's HTTP API, served over HTTPS on 127.0.0.1 (the replicate
// client wraps only https: and data: outputs in FileOutput objects, so plain HTTP would hide
// that path). It records every request, runs each prediction for `durationMs`, honours
// `Prefer: wait` for up to `syncWindowMs`, serves the output files, and POSTs a signed
// webhook when a prediction created with one finishes. The certificate is a self-signed,
// test-only one for 127.0.0.1; `npm test` trusts it through NODE_EXTRA_CA_CERTS.

import crypto from "node:crypto";
import fs from "node:fs";
import https from "node:https";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const fixtures = path.join(here, "..", "fixtures");

export const TOKEN = "r8_test_token";
export const MODEL = "ryansmith/bs-roformer";
export const SECRET = `whsec_${Buffer.from("stemsep-test-signing-secret-0123").toString("base64")}`;

/** `v1,<base64 HMAC-SHA256>` over `id.timestamp.body`, keyed with the secret's base64 part. */
export function sign(secret, id, timestamp, body) {
  const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
  return `v1,${crypto.createHmac("sha256", key).update(`${id}.${timestamp}.${body}`).digest("base64")}`;
}

/** A webhook delivery as a Fetch API Request, signed unless told otherwise. */
export function delivery(prediction, options = {}) {
  const id = options.id ?? `msg_${crypto.randomUUID()}`;
  const timestamp = options.timestamp ?? Math.floor(Date.now() / 1000);
  const body = JSON.stringify(prediction);
  const headers = { "content-type": "application/json" };
  if (!options.unsigned) {
    headers["webhook-id"] = id;
    headers["webhook-timestamp"] = String(timestamp);
    headers["webhook-signature"] = sign(options.secret ?? SECRET, id, timestamp, body);
  }
  return new Request(options.url ?? "http://app.test/webhooks/replicate", {
    method: "POST",
    headers,
    body: options.tamper ? options.tamper(body) : body,
  });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class FakeReplicate {
  requests = [];
  predictions = new Map();
  deliveries = []; // {url, status} of each webhook POST made
  durationMs = 0;
  syncWindowMs = 5000;
  outcome = "succeeded"; // | "failed" | "canceled"
  error = "ValueError: song.mp3: not an audio file";
  stems = ["vocals", "instrumental"];
  order = "model"; // | "swapped": the list in upload-completion order, instrumental first
  outputStyle = "named"; // | "data": data URLs, which carry no file name
  missing = new Set(); // output file names answered with 404
  flaky = new Map(); // output file name -> how many more times to answer 503
  webhookSecret = SECRET;

  static async start() {
    const fake = new FakeReplicate();
    fake.server = https.createServer(
      { key: fs.readFileSync(path.join(fixtures, "test-key.pem")), cert: fs.readFileSync(path.join(fixtures, "test-cert.pem")) },
      (req, res) => fake.handle(req, res).catch((err) => {
        res.statusCode = 500;
        res.end(String(err));
      }),
    );
    await new Promise((resolve) => fake.server.listen(0, "127.0.0.1", resolve));
    fake.url = `https://127.0.0.1:${fake.server.address().port}`;
    return fake;
  }

  get baseUrl() {
    return `${this.url}/v1`;
  }

  async close() {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  api(method) {
    return this.requests.filter((r) => r.path.startsWith("/v1/") && (!method || r.method === method));
  }

  creates() {
    return this.api("POST").filter((r) => r.path.endsWith("/predictions"));
  }

  reply(res, status, payload, type = "application/json") {
    const body = Buffer.isBuffer(payload) ? payload : Buffer.from(JSON.stringify(payload));
    res.writeHead(status, { "content-type": type, "content-length": body.length });
    res.end(body);
  }

  async handle(req, res) {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const body = Buffer.concat(chunks);
    const url = new URL(req.url, this.url);
    this.requests.push({ method: req.method, path: url.pathname, headers: req.headers, body });

    if (url.pathname.startsWith("/files/")) {
      const file = decodeURIComponent(url.pathname.split("/").pop());
      if (this.missing.has(file)) return this.reply(res, 404, { detail: "Not found" });
      if (this.flaky.get(file) > 0) {
        this.flaky.set(file, this.flaky.get(file) - 1);
        return this.reply(res, 503, { detail: "try again" });
      }
      const stem = file.slice(file.lastIndexOf("_") + 1).replace(/\.[^.]*$/, "");
      return this.reply(res, 200, Buffer.from(`RIFF-${stem}-${url.pathname}`), "audio/wav");
    }
    if (req.headers.authorization !== `Bearer ${TOKEN}`) {
      return this.reply(res, 401, { title: "Unauthenticated", detail: "You did not pass a valid authentication token", status: 401 });
    }
    if (req.method === "POST" && url.pathname === "/v1/files") {
      const id = `file${this.requests.length}`;
      return this.reply(res, 201, {
        id, name: "upload", content_type: "application/octet-stream", size: body.length, etag: "e",
        checksums: {}, metadata: {}, created_at: new Date().toISOString(), expires_at: null,
        urls: { get: `https://api.replicate.com/v1/files/${id}` },
      });
    }
    const modelRoute = /^\/v1\/models\/([^/]+)\/([^/]+)\/predictions$/.exec(url.pathname);
    if (req.method === "POST" && (modelRoute || url.pathname === "/v1/predictions")) {
      const request = JSON.parse(body.toString());
      if (request.input?.audio === undefined) {
        return this.reply(res, 422, { title: "Input validation failed", detail: "- audio is required", status: 422 });
      }
      const prediction = this.create(request, modelRoute ? `${modelRoute[1]}/${modelRoute[2]}` : MODEL);
      const prefer = req.headers.prefer;
      if (prefer && /^wait/.test(prefer)) {
        const until = Date.now() + this.syncWindowMs;
        while (Date.now() < until && Date.now() < prediction.doneAt) await sleep(5);
      }
      return this.reply(res, 201, this.view(prediction));
    }
    const get = /^\/v1\/predictions\/([^/]+)$/.exec(url.pathname);
    if (req.method === "GET" && get) {
      const prediction = this.predictions.get(get[1]);
      if (!prediction) return this.reply(res, 404, { detail: "Not found" });
      return this.reply(res, 200, this.view(prediction));
    }
    return this.reply(res, 404, { detail: `no route ${req.method} ${url.pathname}` });
  }

  create(request, model) {
    const id = `pred${String(this.predictions.size + 1).padStart(4, "0")}`;
    const prediction = {
      id, model, version: request.version ?? "v1", input: request.input, webhook: request.webhook,
      webhook_events_filter: request.webhook_events_filter, createdAt: Date.now(),
      doneAt: Date.now() + this.durationMs, outcome: this.outcome,
    };
    this.predictions.set(id, prediction);
    if (request.webhook && (request.webhook_events_filter ?? ["completed"]).includes("completed")) {
      const timer = setTimeout(() => this.deliver(prediction).catch(() => {}), this.durationMs + 1);
      timer.unref();
    }
    return prediction;
  }

  outputs(prediction) {
    const audio = typeof prediction.input.audio === "string" ? prediction.input.audio : "";
    const name = audio.startsWith("http") ? decodeURIComponent(path.basename(new URL(audio).pathname)).replace(/\.[^.]*$/, "") || "audio" : "audio";
    const urls = this.stems.map((stem) =>
      this.outputStyle === "data"
        ? `data:audio/wav;base64,${Buffer.from(`RIFF-${stem}`).toString("base64")}`
        : `${this.url}/files/${prediction.id}/${encodeURIComponent(`${name}_${stem}.wav`)}`,
    );
    return this.order === "swapped" ? urls.reverse() : urls;
  }

  view(prediction) {
    const done = Date.now() >= prediction.doneAt;
    const status = done ? prediction.outcome : "processing";
    return {
      id: prediction.id, model: prediction.model, version: prediction.version, input: prediction.input,
      status, output: done && status === "succeeded" ? this.outputs(prediction) : null,
      error: done && status === "failed" ? this.error : null, logs: "", source: "api", data_removed: false,
      metrics: done ? { predict_time: 1.5 } : {}, created_at: new Date(prediction.createdAt).toISOString(),
      webhook: prediction.webhook, webhook_events_filter: prediction.webhook_events_filter,
      urls: { get: `${this.url}/v1/predictions/${prediction.id}`, cancel: `${this.url}/v1/predictions/${prediction.id}/cancel` },
    };
  }

  /** POST the finished prediction to its webhook, signed, the way Replicate does. */
  async deliver(prediction, { id = `msg_${prediction.id}` } = {}) {
    const body = JSON.stringify(this.view(prediction));
    const timestamp = Math.floor(Date.now() / 1000);
    const response = await fetch(prediction.webhook, {
      method: "POST",
      headers: {
        "content-type": "application/json", "webhook-id": id, "webhook-timestamp": String(timestamp),
        "webhook-signature": sign(this.webhookSecret, id, timestamp, body),
      },
      body,
    });
    this.deliveries.push({ url: prediction.webhook, id, status: response.status, body: await response.text() });
    return response.status;
  }
}
