// docs/typescript.md, "Next.js (app router)": app/webhooks/replicate/route.ts
import { createWebhookHandler, type CompletedPrediction } from "stemsep-replicate";

export const runtime = "nodejs"; // "edge" works too: the handler only needs the Fetch API

// Stand-ins for your own persistence.
declare function saveStems(songId: string, stems: Record<string, string>, predictTime: number | null): Promise<void>;
declare function markFailed(songId: string, status: string, error: string | null): Promise<void>;

const handler = createWebhookHandler({
  secret: process.env.REPLICATE_WEBHOOK_SECRET!, // whsec_..., from GET /v1/webhooks/default/secret
  onCompleted: async (prediction: CompletedPrediction) => {
    await saveStems(prediction.id, prediction.stems!, prediction.predictTime);
  },
  onFailure: async ({ id, status, error }) => {
    await markFailed(id, status, error);
  },
});

export async function POST(request: Request): Promise<Response> {
  return handler(request);
}
