// createWebhookHandler: signature checks, replays, duplicates, callbacks; and the whole loop
// (submit -> the fake finishes the prediction -> it POSTs a signed webhook to a local app).

import assert from "node:assert/strict";
import http from "node:http";
import { after, before, beforeEach, describe, test } from "node:test";

import express from "express";

import { MemoryDedupeStore, createWebhookHandler, submit } from "../dist/index.js";
import { toNodeHandler } from "../dist/node.js";
import { FakeReplicate, MODEL, SECRET, TOKEN, delivery } from "./support/fake-replicate.js";

const OUT = "https://replicate.delivery/xezq/abc";

function prediction(fields = {}) {
  return {
    id: "pred0042", model: MODEL, version: "v1", status: "succeeded", input: { audio: "https://example.com/song.mp3" },
    output: [`${OUT}/song_instrumental.wav`, `${OUT}/song_vocals.wav`], // upload-completion order
    error: null, logs: "", metrics: { predict_time: 21.5 }, created_at: "2026-01-01T00:00:00Z",
    urls: { get: "https://api.replicate.com/v1/predictions/pred0042" },
    ...fields,
  };
}

function harness(extra = {}) {
  const calls = { completed: [], failure: [], errors: [] };
  const handler = createWebhookHandler({
    secret: SECRET,
    onCompleted: (event) => {
      calls.completed.push(event);
    },
    onError: (error, context) => calls.errors.push({ error, context }),
    ...extra,
  });
  return { handler, calls };
}

async function body(response) {
  return JSON.parse(await response.text());
}

describe("webhook handler", () => {
  test("a valid delivery hands the stems, by name, to the callback", async () => {
    const { handler, calls } = harness();
    const response = await handler(delivery(prediction(), { id: "msg_1" }));
    assert.equal(response.status, 200);
    assert.deepEqual(await body(response), { ok: true });
    assert.equal(calls.completed.length, 1);
    const [event] = calls.completed;
    assert.deepEqual(event.stems, { vocals: `${OUT}/song_vocals.wav`, instrumental: `${OUT}/song_instrumental.wav` });
    assert.equal(event.id, "pred0042");
    assert.equal(event.status, "succeeded");
    assert.equal(event.predictTime, 21.5);
    assert.equal(event.webhookId, "msg_1");
    assert.equal(event.error, null);
  });

  test("a tampered body is refused with 401", async () => {
    const { handler, calls } = harness();
    const request = delivery(prediction(), { tamper: (text) => text.replace("song_vocals", "evil_vocals") });
    const response = await handler(request);
    assert.equal(response.status, 401);
    assert.match((await body(response)).error, /bad signature: No matching signature found/);
    assert.equal(calls.completed.length, 0);
  });

  test("a stale timestamp (over 5 minutes old) or one from the future is refused with 401", async () => {
    const { handler, calls } = harness();
    const now = Math.floor(Date.now() / 1000);
    const old = await handler(delivery(prediction(), { timestamp: now - 301 }));
    assert.equal(old.status, 401);
    assert.match((await body(old)).error, /too old/);
    const future = await handler(delivery(prediction(), { timestamp: now + 301 }));
    assert.equal(future.status, 401);
    assert.match((await body(future)).error, /too new/);
    const recent = await handler(delivery(prediction(), { timestamp: now - 240 }));
    assert.equal(recent.status, 200);
    assert.equal(calls.completed.length, 1);
  });

  test("an unsigned delivery, or one signed with another secret, is refused with 401", async () => {
    const { handler, calls } = harness();
    const unsigned = await handler(delivery(prediction(), { unsigned: true }));
    assert.equal(unsigned.status, 401);
    assert.match((await body(unsigned)).error, /^unsigned/);
    const other = `whsec_${Buffer.from("another-secret-another-secret-00").toString("base64")}`;
    assert.equal((await handler(delivery(prediction(), { secret: other }))).status, 401);
    assert.equal(calls.completed.length, 0);
  });

  test("a duplicate delivery (same webhook-id) is acknowledged and not handled again", async () => {
    const { handler, calls } = harness();
    assert.equal((await handler(delivery(prediction(), { id: "msg_dup" }))).status, 200);
    const again = await handler(delivery(prediction(), { id: "msg_dup" }));
    assert.equal(again.status, 200);
    assert.deepEqual(await body(again), { duplicate: true });
    assert.equal(calls.completed.length, 1);
    assert.equal((await handler(delivery(prediction(), { id: "msg_other" }))).status, 200);
    assert.equal(calls.completed.length, 2);
  });

  test("a duplicate that arrives while the first is being handled gets 409, so Replicate retries it", async () => {
    let release;
    const gate = new Promise((resolve) => {
      release = resolve;
    });
    const { handler, calls } = harness({
      onCompleted: async (event) => {
        await gate;
        calls.completed.push(event);
      },
    });
    const first = handler(delivery(prediction(), { id: "msg_slow" }));
    await new Promise((resolve) => setTimeout(resolve, 10));
    const second = await handler(delivery(prediction(), { id: "msg_slow" }));
    assert.equal(second.status, 409);
    release();
    assert.equal((await first).status, 200);
    assert.deepEqual(await body(await handler(delivery(prediction(), { id: "msg_slow" }))), { duplicate: true });
    assert.equal(calls.completed.length, 1);
  });

  test("a callback that throws answers 500, is reported, and Replicate's retry is handled", async () => {
    let failures = 1;
    const { handler, calls } = harness({
      onCompleted: (event) => {
        if (failures-- > 0) throw new Error("database is down");
        calls.completed.push(event);
      },
    });
    const response = await handler(delivery(prediction(), { id: "msg_retry" }));
    assert.equal(response.status, 500);
    assert.deepEqual(await body(response), { error: "database is down" });
    assert.equal(calls.errors.length, 1);
    assert.deepEqual(calls.errors[0].context, { webhookId: "msg_retry", predictionId: "pred0042" });
    assert.equal((await handler(delivery(prediction(), { id: "msg_retry" }))).status, 200);
    assert.equal(calls.completed.length, 1);
  });

  test("a karaoke prediction's stems are named by the model input it carries", async () => {
    const { handler, calls } = harness();
    const output = [`${OUT}/song_other.wav`, `${OUT}/song_karaoke.wav`];
    const karaoke = prediction({ input: { audio: "https://example.com/song.mp3", model: "karaoke" }, output });
    assert.equal((await handler(delivery(karaoke))).status, 200);
    assert.deepEqual(calls.completed[0].stems, { karaoke: output[1], other: output[0] });
  });

  test("an aborted prediction is terminal: handled once, like a failure", async () => {
    const failure = [];
    const { handler, calls } = harness({ onFailure: (event) => failure.push(event) });
    const aborted = prediction({ status: "aborted", output: null, error: "aborted" });
    const response = await handler(delivery(aborted, { id: "msg_aborted" }));
    assert.equal(response.status, 200);
    assert.deepEqual(await body(response), { ok: true });
    assert.equal(failure.length, 1);
    assert.equal(failure[0].status, "aborted");
    assert.equal(calls.completed.length, 0);
    assert.deepEqual(await body(await handler(delivery(aborted, { id: "msg_aborted" }))), { duplicate: true });
  });

  test("failed and canceled predictions go to onFailure, or to onCompleted with their status", async () => {
    const failure = [];
    const { handler, calls } = harness({ onFailure: (event) => failure.push(event) });
    const failed = prediction({ status: "failed", output: null, error: "ValueError: not an audio file" });
    assert.equal((await handler(delivery(failed))).status, 200);
    assert.equal(calls.completed.length, 0);
    assert.equal(failure[0].status, "failed");
    assert.equal(failure[0].error, "ValueError: not an audio file");
    assert.equal(failure[0].stems, null);

    const plain = harness();
    assert.equal((await plain.handler(delivery(prediction({ status: "canceled", output: null })))).status, 200);
    assert.equal(plain.calls.completed[0].status, "canceled");
    assert.equal(plain.calls.completed[0].stems, null);
  });

  test("non-terminal events are acknowledged and ignored; other methods get 405", async () => {
    const { handler, calls } = harness();
    const response = await handler(delivery(prediction({ status: "processing", output: null })));
    assert.equal(response.status, 200);
    assert.deepEqual(await body(response), { ignored: "status processing" });
    assert.equal((await handler(new Request("http://app.test/webhooks/replicate"))).status, 405);
    assert.equal(calls.completed.length, 0);
  });

  test("the dedupe store is pluggable (async, e.g. Redis)", async () => {
    const seen = new Map();
    const log = [];
    const store = {
      async begin(id) {
        log.push(`begin ${id}`);
        if (seen.has(id)) return seen.get(id);
        seen.set(id, "processing");
        return "new";
      },
      async finish(id) {
        log.push(`finish ${id}`);
        seen.set(id, "done");
      },
      async abort(id) {
        log.push(`abort ${id}`);
        seen.delete(id);
      },
    };
    const { handler, calls } = harness({ store });
    await handler(delivery(prediction(), { id: "m1" }));
    await handler(delivery(prediction(), { id: "m1" }));
    assert.deepEqual(log, ["begin m1", "finish m1", "begin m1"]);
    assert.equal(calls.completed.length, 1);
  });

  test("MemoryDedupeStore forgets after its TTL and lets a crashed handler's lease lapse", async () => {
    const store = new MemoryDedupeStore({ ttlMs: 20, leaseMs: 20 });
    assert.equal(store.begin("a"), "new");
    assert.equal(store.begin("a"), "processing");
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.equal(store.begin("a"), "new");
    store.finish("a");
    assert.equal(store.begin("a"), "done");
    const small = new MemoryDedupeStore({ maxEntries: 2 });
    for (const id of ["x", "y", "z"]) small.begin(id);
    assert.equal(small.begin("x"), "new", "the oldest entry made room");
  });

  test("an unusable secret is a reported 500, not a 401", async () => {
    const { handler, calls } = harness({ secret: "whsec_" });
    const response = await handler(delivery(prediction()));
    assert.equal(response.status, 500);
    assert.match((await body(response)).error, /signing secret is unusable/);
    assert.equal(calls.errors.length, 1);
  });
});

// the whole loop, over HTTP -------------------------------------------------------------------

describe("submit, then the signed webhook to a running app", () => {
  let fake;
  let server;
  let appUrl;
  const received = [];
  let app;

  before(async () => {
    fake = await FakeReplicate.start();
    fake.durationMs = 30;
    const handler = createWebhookHandler({ secret: SECRET, onCompleted: (event) => received.push(event) });
    app = express();
    app.post("/webhooks/replicate", toNodeHandler(handler)); // before any body parser
    app.post("/raw/webhooks/replicate", express.raw({ type: "*/*" }), toNodeHandler(handler));
    app.use(express.json());
    app.post("/parsed/webhooks/replicate", toNodeHandler(handler)); // after one: refused, with the reason
    server = http.createServer(app);
    await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
    appUrl = `http://127.0.0.1:${server.address().port}`;
  });
  after(async () => {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
    await fake.close();
  });
  beforeEach(() => {
    received.length = 0;
    fake.deliveries = [];
  });

  async function waitFor(predicate, ms = 3000) {
    const deadline = Date.now() + ms;
    while (!predicate() && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10));
    assert.ok(predicate(), "timed out");
  }

  test("Express: the route gets the stems once, and Replicate's redelivery is a duplicate", async () => {
    const id = await submit("https://example.com/Song One.mp3", `${appUrl}/webhooks/replicate`, {
      model: MODEL, auth: TOKEN, baseUrl: fake.baseUrl,
    });
    await waitFor(() => fake.deliveries.length === 1);
    assert.equal(fake.deliveries[0].status, 200);
    assert.equal(received.length, 1);
    assert.equal(received[0].id, id);
    assert.deepEqual(Object.keys(received[0].stems), ["vocals", "instrumental"]);
    assert.match(received[0].stems.vocals, /\/Song%20One_vocals\.wav$/);

    assert.equal(await fake.deliver(fake.predictions.get(id)), 200); // same webhook-id again
    assert.deepEqual(JSON.parse(fake.deliveries[1].body), { duplicate: true });
    assert.equal(received.length, 1);
  });

  test("Express with express.raw() works; behind express.json() it is a 500 that says why", async () => {
    const id = await submit("https://example.com/two.mp3", `${appUrl}/raw/webhooks/replicate`, {
      model: MODEL, auth: TOKEN, baseUrl: fake.baseUrl,
    });
    await waitFor(() => fake.deliveries.length === 1);
    assert.equal(fake.deliveries[0].status, 200);
    assert.equal(received[0].id, id);

    await submit("https://example.com/three.mp3", `${appUrl}/parsed/webhooks/replicate`, {
      model: MODEL, auth: TOKEN, baseUrl: fake.baseUrl,
    });
    await waitFor(() => fake.deliveries.length === 2);
    assert.equal(fake.deliveries[1].status, 500);
    assert.match(JSON.parse(fake.deliveries[1].body).error, /already parsed \(express\.json\(\)\?\).*express\.raw/);
    assert.equal(received.length, 1);
  });

  test("a plain node:http server works the same way", async () => {
    const handler = createWebhookHandler({ secret: SECRET, onCompleted: (event) => received.push(event) });
    const plain = http.createServer(toNodeHandler(handler));
    await new Promise((resolve) => plain.listen(0, "127.0.0.1", resolve));
    try {
      await submit("https://example.com/four.mp3", `http://127.0.0.1:${plain.address().port}/hook`, {
        model: MODEL, auth: TOKEN, baseUrl: fake.baseUrl,
      });
      await waitFor(() => received.length === 1);
      const tampered = await fetch(`http://127.0.0.1:${plain.address().port}/hook`, {
        method: "POST", body: "{}", headers: { "webhook-id": "x", "webhook-timestamp": "1", "webhook-signature": "v1,AAAA" },
      });
      assert.equal(tampered.status, 401);
    } finally {
      plain.closeAllConnections();
      await new Promise((resolve) => plain.close(resolve));
    }
  });
});
