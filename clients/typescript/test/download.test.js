// Fetching the stems: a missing output URL is a clear error naming the stem and the URL,
// reported where the caller can see it, never an unhandled rejection.

import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, afterEach, before, beforeEach, test } from "node:test";

import Replicate from "replicate";

import { StemFetchError, createWebhookHandler, fetchStem, separate } from "../dist/index.js";
import { downloadStems } from "../dist/node.js";
import { FakeReplicate, MODEL, SECRET, TOKEN, delivery } from "./support/fake-replicate.js";

let fake;
let dir;
const stray = [];
const onStray = (err) => stray.push(err);

before(async () => {
  fake = await FakeReplicate.start();
  process.on("unhandledRejection", onStray);
  process.on("uncaughtException", onStray);
});
after(async () => {
  process.off("unhandledRejection", onStray);
  process.off("uncaughtException", onStray);
  await fake.close();
});
beforeEach(() => {
  Object.assign(fake, { requests: [], predictions: new Map(), missing: new Set(), flaky: new Map(), order: "swapped" });
  dir = fs.mkdtempSync(path.join(os.tmpdir(), "stemsep-js-"));
  stray.length = 0;
});
afterEach(async () => {
  await new Promise((resolve) => setTimeout(resolve, 50)); // let any stray rejection surface
  assert.deepEqual(stray, [], "nothing may be thrown into the void");
  fs.rmSync(dir, { recursive: true, force: true });
});

const options = () => ({ model: MODEL, auth: TOKEN, baseUrl: fake.baseUrl });

test("downloadStems saves each stem as <name>_<stem>.<ext>, atomically", async () => {
  const stems = await separate("https://example.com/song.mp3", options());
  const paths = await downloadStems(stems, dir, { name: "song" });
  assert.deepEqual(paths, { vocals: path.join(dir, "song_vocals.wav"), instrumental: path.join(dir, "song_instrumental.wav") });
  assert.equal(fs.readFileSync(paths.vocals, "utf8"), "RIFF-vocals-/files/pred0001/song_vocals.wav");
  assert.deepEqual(fs.readdirSync(dir).sort(), ["song_instrumental.wav", "song_vocals.wav"]);
});

test("a 404 on an output URL rejects with the stem and the URL; the other stem is still saved", async () => {
  fake.missing.add("song_vocals.wav");
  const stems = await separate("https://example.com/song.mp3", options());
  await assert.rejects(downloadStems(stems, dir), (err) => {
    assert.ok(err instanceof StemFetchError);
    assert.equal(err.stem, "vocals");
    assert.equal(err.url, stems.vocals);
    assert.equal(err.status, 404);
    assert.equal(err.message, `vocals: could not fetch ${stems.vocals}: HTTP 404 Not Found (Replicate deletes outputs an hour after the prediction ends)`);
    return true;
  });
  assert.deepEqual(fs.readdirSync(dir), ["instrumental.wav"], "no partial file left behind");
  assert.equal(fake.requests.filter((r) => r.path.endsWith("song_vocals.wav")).length, 1, "a 404 is not retried");
});

test("429/5xx on an output URL are retried with backoff", async () => {
  fake.flaky.set("song_vocals.wav", 2);
  const stems = await separate("https://example.com/song.mp3", options());
  const response = await fetchStem("vocals", stems.vocals, { backoff: 5 });
  assert.equal(await response.text(), "RIFF-vocals-/files/pred0001/song_vocals.wav");
  assert.equal(fake.requests.filter((r) => r.path.endsWith("song_vocals.wav")).length, 3);

  fake.flaky.set("song_vocals.wav", 5);
  await assert.rejects(fetchStem("vocals", stems.vocals, { backoff: 1, attempts: 3 }),
    { name: "StemFetchError", message: `vocals: could not fetch ${stems.vocals}: HTTP 503 Service Unavailable after 3 attempts` });
});

test("with FileOutput objects, a 404 output neither escapes nor hides: separate returns, the download names it", async () => {
  fake.missing.add("song_vocals.wav");
  const client = new Replicate({ auth: TOKEN, baseUrl: fake.baseUrl }); // FileOutput on: each one GETs its URL at once

  // What replicate's own FileOutput gives for a 404: an unrelated ReferenceError.
  const raw = await client.run(MODEL, { input: { audio: "https://example.com/song.mp3" } });
  const vocals = raw.find((item) => String(item).endsWith("_vocals.wav"));
  await assert.rejects(vocals.blob(), { name: "ReferenceError" });
  for (const item of raw) await item.cancel().catch(() => {});

  const stems = await separate("https://example.com/song.mp3", { model: MODEL, replicate: client });
  assert.match(stems.vocals, /\/pred0002\/song_vocals\.wav$/);
  await assert.rejects(downloadStems(stems, dir, { name: "song" }), { name: "StemFetchError", stem: "vocals", url: stems.vocals, status: 404 });
});

test("in a webhook callback, a 404 becomes a 500 that names the stem and is reported", async () => {
  fake.missing.add("song_instrumental.wav");
  const stems = await separate("https://example.com/song.mp3", options());
  const reported = [];
  const handler = createWebhookHandler({
    secret: SECRET,
    onCompleted: async (event) => {
      await downloadStems(event.stems, dir, { name: event.id });
    },
    onError: (error, context) => reported.push({ error, context }),
  });
  const prediction = {
    id: "pred0001", status: "succeeded", output: [stems.instrumental, stems.vocals], error: null,
    metrics: { predict_time: 3 }, input: {}, urls: {},
  };
  const response = await handler(delivery(prediction, { id: "msg_404" }));
  assert.equal(response.status, 500);
  const { error } = await response.json();
  assert.equal(error, `instrumental: could not fetch ${stems.instrumental}: HTTP 404 Not Found (Replicate deletes outputs an hour after the prediction ends)`);
  assert.equal(reported.length, 1);
  assert.ok(reported[0].error instanceof StemFetchError);
  assert.deepEqual(reported[0].context, { webhookId: "msg_404", predictionId: "pred0001" });
});
