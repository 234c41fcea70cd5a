// docs/typescript.md, "separate" and "submit"
import { readFile } from "node:fs/promises";

import Replicate from "replicate";
import { PredictionError, separate, submit } from "stemsep-replicate";
import { downloadStems } from "stemsep-replicate/node";

// A URL: the model fetches it. Token from REPLICATE_API_TOKEN, model from REPLICATE_MODEL
// unless given here.
const stems = await separate("https://example.com/songs/track01.mp3", {
  model: "ryansmith/bs-roformer",
  input: { output_format: "flac" },
});
console.log(stems.vocals, stems.instrumental);

// Local bytes: uploaded by the replicate client first (100 MB at most).
const bytes = await readFile("track02.wav");
const stems2 = await separate(new Blob([bytes], { type: "audio/wav" }), { model: "ryansmith/bs-roformer" });

// Save them before Replicate deletes them (an hour after the prediction ends).
const paths = await downloadStems(stems2, "separated", { name: "track02" });
console.log(paths.vocals); // separated/track02_vocals.flac

// Your own client works too, with or without FileOutput objects.
const replicate = new Replicate({ auth: process.env.REPLICATE_API_TOKEN });
try {
  await separate("https://example.com/songs/track03.mp3", { replicate, model: "ryansmith/bs-roformer" });
} catch (err) {
  if (err instanceof PredictionError) console.error(err.predictionId, err.status, err.message);
  else throw err;
}

// Long audio: do not wait; Replicate POSTs the result to your webhook.
const id = await submit("https://example.com/songs/live-set.flac", "https://app.example.com/webhooks/replicate", {
  model: "ryansmith/bs-roformer",
});
console.log(`submitted ${id}`);
