// separate() and submit() against the fake API, through the real `replicate` client.

import assert from "node:assert/strict";
import { after, afterEach, before, beforeEach, describe, test } from "node:test";

import Replicate from "replicate";

import {
  PredictionError, StemsepError, expectedStems, fileStem, knownStems, separate, stemOf, stemsFromOutput, submit,
} from "../dist/index.js";
import { FakeReplicate, MODEL, TOKEN } from "./support/fake-replicate.js";

let fake;
let options;

before(async () => {
  fake = await FakeReplicate.start();
});
after(async () => {
  await fake.close();
});
beforeEach(() => {
  Object.assign(fake, {
    requests: [], predictions: new Map(), deliveries: [], durationMs: 0, syncWindowMs: 5000, outcome: "succeeded", order: "model",
    outputStyle: "named", stems: ["vocals", "instrumental"], missing: new Set(),
  });
  options = { model: MODEL, auth: TOKEN, baseUrl: fake.baseUrl, pollInterval: 10 };
});

const fileUrl = (id, file) => `${fake.url}/files/${id}/${file}`;

describe("separate", () => {
  test("a sync call returns the stems by file name even when the list comes back swapped", async () => {
    fake.order = "swapped";
    const stems = await separate("https://example.com/My Song.mp3", options);

    assert.deepEqual(stems, {
      vocals: fileUrl("pred0001", "My%20Song_vocals.wav"),
      instrumental: fileUrl("pred0001", "My%20Song_instrumental.wav"),
    });
    assert.deepEqual(Object.keys(stems), ["vocals", "instrumental"]);
    const [create] = fake.creates();
    assert.equal(create.path, `/v1/models/${MODEL}/predictions`);
    assert.equal(create.headers.prefer, "wait"); // replicate.run's blocking create
    assert.equal(create.headers.authorization, `Bearer ${TOKEN}`);
    assert.deepEqual(JSON.parse(create.body), { input: { audio: "https://example.com/My Song.mp3" } });
    assert.equal(fake.api("GET").length, 0, "finished inside the blocking wait: no polling");
    assert.equal(fake.requests.filter((r) => r.path.startsWith("/files/")).length, 0, "nothing downloaded");
  });

  test("a client with FileOutput objects (replicate's default) gives the same URL strings", async () => {
    fake.order = "swapped";
    const client = new Replicate({ auth: TOKEN, baseUrl: fake.baseUrl }); // useFileOutput defaults to true
    const raw = await client.run(MODEL, { input: { audio: "https://example.com/a.wav" } });
    assert.equal(typeof raw[0].url, "function", "replicate wraps https outputs in FileOutput");
    assert.ok(raw[0].url() instanceof URL);
    assert.ok(raw[0] instanceof ReadableStream);
    for (const item of raw) await item.cancel(); // (they start downloading on their own)

    const stems = await separate("https://example.com/a.wav", { ...options, replicate: client });
    assert.deepEqual(stems, { vocals: fileUrl("pred0002", "a_vocals.wav"), instrumental: fileUrl("pred0002", "a_instrumental.wav") });
    for (const url of Object.values(stems)) assert.equal(typeof url, "string");
    // Each FileOutput sends its GET the moment run() returns, wanted or not (separate cancels
    // the bodies): let those four requests land before the next test counts requests.
    const deadline = Date.now() + 2000;
    while (fake.requests.filter((r) => r.path.startsWith("/files/")).length < 4 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    assert.equal(fake.requests.filter((r) => r.path.startsWith("/files/")).length, 4);
  });

  test("a client with useFileOutput: false gives plain strings, handled the same way", async () => {
    const client = new Replicate({ auth: TOKEN, baseUrl: fake.baseUrl, useFileOutput: false });
    const stems = await separate("https://example.com/b.wav", { model: MODEL, replicate: client });
    assert.deepEqual(stems, { vocals: fileUrl("pred0001", "b_vocals.wav"), instrumental: fileUrl("pred0001", "b_instrumental.wav") });
    assert.equal(fake.requests.filter((r) => r.path.startsWith("/files/")).length, 0);
  });

  test("a prediction still processing when the blocking wait ends is polled to the end, not returned empty", async () => {
    fake.durationMs = 150;
    fake.syncWindowMs = 20; // Replicate holds a `Prefer: wait` request for at most 60 s
    const stems = await separate("https://example.com/long.wav", options);
    assert.deepEqual(Object.keys(stems), ["vocals", "instrumental"]);
    assert.ok(fake.api("GET").length >= 1);
    assert.ok(fake.api("GET").every((r) => r.path === "/v1/predictions/pred0001"));
  });

  test("every stem of a model with more outputs is returned, by name, in the model's order", async () => {
    Object.assign(fake, { stems: ["drums", "bass", "other", "vocals"], order: "swapped" });
    const stems = await separate("https://example.com/c.wav", { ...options, input: { model: "4stem" } });
    assert.deepEqual(Object.keys(stems), ["drums", "bass", "other", "vocals"]);
    assert.equal(stems.bass, fileUrl("pred0001", "c_bass.wav"));
  });

  test("the model input passes through: a karaoke prediction gives its karaoke and other stems", async () => {
    Object.assign(fake, { stems: ["karaoke", "other"], order: "swapped" });
    const stems = await separate("https://example.com/song.mp3", { ...options, input: { model: "karaoke" } });
    assert.deepEqual(stems, { karaoke: fileUrl("pred0001", "song_karaoke.wav"), other: fileUrl("pred0001", "song_other.wav") });
    assert.deepEqual(JSON.parse(fake.creates()[0].body).input, { model: "karaoke", audio: "https://example.com/song.mp3" });
  });

  test("one stem chosen gives one stem, named or not", async () => {
    for (const outputStyle of ["named", "data"]) {
      Object.assign(fake, { stems: ["instrumental"], outputStyle });
      const stems = await separate("https://example.com/song.mp3", { ...options, input: { stems: "instrumental" } });
      assert.deepEqual(Object.keys(stems), ["instrumental"]);
    }
  });

  test("unnamed outputs of a model whose order is unknown are refused in one sentence", async () => {
    Object.assign(fake, { stems: ["left", "right"], outputStyle: "data" });
    await assert.rejects(separate("https://example.com/d.wav", { ...options, input: { model: "stereo-split" } }), {
      name: "StemsepError",
      message: "cannot tell which stem each of the prediction's 2 outputs is: their file names do not say and " +
        "model 'stereo-split' is not in the catalogue, so its stem order is unknown",
    });
  });

  test("unnamed outputs (data URLs) fall back to the model's order", async () => {
    fake.outputStyle = "data";
    const stems = await separate("https://example.com/d.wav", options);
    assert.ok(stems.vocals.startsWith("data:audio/wav;base64,"));
    assert.equal(Buffer.from(stems.instrumental.split(",")[1], "base64").toString(), "RIFF-instrumental");
  });

  test("bytes are uploaded first and the file URL is passed", async () => {
    await separate(new Uint8Array([82, 73, 70, 70, 1, 2, 3]), options);
    const [upload, create] = fake.api("POST");
    assert.equal(upload.path, "/v1/files");
    assert.match(upload.headers["content-type"], /^multipart\/form-data/);
    assert.match(JSON.parse(create.body).input.audio, /^https:\/\/api\.replicate\.com\/v1\/files\/file\d+$/);
  });

  test("other model inputs and a pinned version", async () => {
    await separate("https://example.com/e.wav", { ...options, model: `${MODEL}:abc123`, input: { output_format: "flac", overlap: 2 } });
    const [create] = fake.creates();
    assert.equal(create.path, "/v1/predictions");
    assert.deepEqual(JSON.parse(create.body), { version: "abc123", input: { output_format: "flac", overlap: 2, audio: "https://example.com/e.wav" } });
  });

  test("a failed prediction rejects with its id and error", async () => {
    fake.outcome = "failed";
    await assert.rejects(separate("https://example.com/f.wav", options), (err) => {
      assert.ok(err instanceof PredictionError);
      assert.equal(err.message, "prediction pred0001 failed: ValueError: song.mp3: not an audio file");
      assert.equal(err.predictionId, "pred0001");
      assert.equal(err.status, "failed");
      return true;
    });
  });

  test("a failure seen while polling is reported the same way", async () => {
    Object.assign(fake, { outcome: "failed", durationMs: 80, syncWindowMs: 10 });
    await assert.rejects(separate("https://example.com/f.wav", options), /^PredictionError: prediction pred0001 failed: ValueError/);
  });

  test("a canceled prediction rejects instead of returning nothing", async () => {
    fake.outcome = "canceled";
    await assert.rejects(separate("https://example.com/g.wav", options), { name: "PredictionError", message: "prediction pred0001 canceled: no error message" });
  });

  test("API refusals are one sentence with the HTTP status", async () => {
    await assert.rejects(separate("https://example.com/h.wav", { ...options, auth: "r8_wrong" }),
      { message: "Replicate refused to create a prediction: HTTP 401: You did not pass a valid authentication token" });
  });

  test("a missing model or token is named before any request", async () => {
    const saved = { model: process.env.REPLICATE_MODEL, token: process.env.REPLICATE_API_TOKEN };
    delete process.env.REPLICATE_MODEL;
    delete process.env.REPLICATE_API_TOKEN;
    try {
      await assert.rejects(separate("https://example.com/a.wav", { auth: TOKEN, baseUrl: fake.baseUrl }), /no Replicate model given/);
      await assert.rejects(separate("https://example.com/a.wav", { model: "bs-roformer", auth: TOKEN }), /not of the form owner\/name/);
      await assert.rejects(separate("https://example.com/a.wav", { model: MODEL, baseUrl: fake.baseUrl }), StemsepError);
      await assert.rejects(submit("https://example.com/a.wav", "ftp://x/hook", options), /not an http\(s\) URL/);
    } finally {
      if (saved.model !== undefined) process.env.REPLICATE_MODEL = saved.model;
      if (saved.token !== undefined) process.env.REPLICATE_API_TOKEN = saved.token;
    }
    assert.equal(fake.requests.length, 0);
  });
});

describe("submit", () => {
  test("creates the prediction with the webhook and the completed filter, returns its id without waiting", async () => {
    fake.durationMs = 10_000;
    const id = await submit("https://example.com/long.wav", "https://app.example/webhooks/replicate", options);
    assert.equal(id, "pred0001");
    const [create] = fake.creates();
    assert.equal(create.path, `/v1/models/${MODEL}/predictions`);
    assert.deepEqual(JSON.parse(create.body), {
      input: { audio: "https://example.com/long.wav" },
      webhook: "https://app.example/webhooks/replicate",
      webhook_events_filter: ["completed"],
    });
    assert.equal(create.headers.prefer, undefined);
    assert.equal(fake.api("GET").length, 0);
  });
});

describe("naming (the same rule and cases as stemsep's Python tests)", () => {
  test("fileStem: the longest known stem, else no_<x> or the part after the last underscore", () => {
    const cases = [
      ["song_vocals.WAV", null, "vocals"],
      ["my_song_drums.flac", null, "drums"],
      ["my_song_no_guitar.wav", null, "no_guitar"],
      ["My Song_No_Guitar.wav", null, "no_guitar"],
      ["my_song_lead_vocals.wav", null, "vocals"],
      ["my_song_lead_vocals.wav", ["vocals", "lead_vocals"], "lead_vocals"],
      ["my_song_acoustic_guitar.mp3", ["guitar", "acoustic_guitar", "no_acoustic_guitar"], "acoustic_guitar"],
      ["my_song_no_acoustic_guitar.mp3", ["guitar", "acoustic_guitar", "no_acoustic_guitar"], "no_acoustic_guitar"],
      ["no_guitar_karaoke.wav", ["karaoke", "other"], "karaoke"],
      ["song_other.wav", ["karaoke", "other", "no_karaoke", "no_other"], "other"],
      ["vocals.wav", ["vocals"], null],
      ["song_vocals", null, null],
      ["song_voc@ls.wav", null, null],
    ];
    for (const [name, known, stem] of cases) assert.equal(fileStem(name, known), stem, name);
  });

  test("stemOf reads the URL's file name", () => {
    assert.equal(stemOf("https://replicate.delivery/x/my_song_vocals.WAV?sig=1"), "vocals");
    assert.equal(stemOf("https://replicate.delivery/x/vocals_and_more_instrumental.flac"), "instrumental");
    assert.equal(stemOf("https://replicate.delivery/x/My%20Song_drums.wav"), "drums");
    assert.equal(stemOf("https://replicate.delivery/x/my%20song_no_guitar.wav"), "no_guitar");
    assert.equal(stemOf("https://replicate.delivery/x/vocals.wav"), null);
    assert.equal(stemOf("https://replicate.delivery/x_vocals.wav/out"), null);
    assert.equal(stemOf("data:audio/wav;base64,AAAA"), null);
  });

  test("known and expected stems come from the catalogue's stems", () => {
    assert.deepEqual(knownStems(), ["vocals", "instrumental", "no_vocals", "no_instrumental"]);
    assert.deepEqual(expectedStems({ model: "4stem", stems: "vocals,bass" }), ["bass", "vocals"]);
    assert.deepEqual(expectedStems({ model: "sw", stems: "no_guitar,piano,guitar" }), ["guitar", "piano", "no_guitar"]);
    assert.equal(knownStems({ model: "x" }), null);
  });

  test("stemsFromOutput: names first, the documented order only for unnamed outputs, else a clear error", () => {
    const v = "https://a/x/s_vocals.wav";
    const i = "https://a/y/s_instrumental.wav";
    assert.deepEqual(stemsFromOutput([i, v]), { vocals: v, instrumental: i });
    assert.deepEqual(Object.keys(stemsFromOutput([i, v])), ["vocals", "instrumental"]);
    assert.deepEqual(stemsFromOutput([new URL(i), new URL(v)]), { vocals: v, instrumental: i });
    assert.deepEqual(stemsFromOutput(["https://a/1.wav", "https://a/2.wav"]), { vocals: "https://a/1.wav", instrumental: "https://a/2.wav" });
    assert.deepEqual(stemsFromOutput(["https://a/b_vocals.wav", "https://a/c_vocals.wav"]), { vocals: "https://a/b_vocals.wav", instrumental: "https://a/c_vocals.wav" });
    assert.deepEqual(stemsFromOutput({ vocals: v }), { vocals: v });
    const practice = ["https://r/a/my_song_no_guitar.wav", "https://r/b/my_song_guitar.wav"];
    assert.deepEqual(stemsFromOutput(practice, { model: "some-guitar-model" }), { no_guitar: practice[0], guitar: practice[1] });
    const data = ["data:audio/wav;base64,AA", "data:audio/wav;base64,BB"];
    assert.deepEqual(stemsFromOutput(data, { model: "karaoke" }), { karaoke: data[0], other: data[1] });
    assert.deepEqual(stemsFromOutput(data, { model: "4stem", stems: "vocals, drums" }), { drums: data[0], vocals: data[1] });
    assert.throws(() => stemsFromOutput(["https://a/1.wav", "https://a/2.wav", "https://a/3.wav"]),
      /^StemsepError: cannot tell which stem each of the prediction's 3 outputs is: their file names do not say and model '1297' documents 2 of them, not 3$/);
    for (const bad of [null, "https://a/v.wav", [], [1, 2], ["ftp://a/x_vocals.wav"], { "../x": "https://a/v.wav" }]) {
      assert.throws(() => stemsFromOutput(bad), StemsepError);
    }
  });
});
