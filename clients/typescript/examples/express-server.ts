// docs/typescript.md, "Express"
import express from "express";
import { createWebhookHandler } from "stemsep-replicate";
import { downloadStems, toNodeHandler } from "stemsep-replicate/node";

const app = express();

const handler = createWebhookHandler({
  secret: process.env.REPLICATE_WEBHOOK_SECRET!,
  onCompleted: async (prediction) => {
    if (prediction.status !== "succeeded" || !prediction.stems) {
      console.error(`prediction ${prediction.id} ${prediction.status}: ${prediction.error}`);
      return;
    }
    await downloadStems(prediction.stems, "separated", { name: prediction.id });
  },
});

// Before express.json(): the signature is over the raw bytes.
app.post("/webhooks/replicate", toNodeHandler(handler));
app.use(express.json());

app.listen(3000);
