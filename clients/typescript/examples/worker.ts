// docs/typescript.md, "Cloudflare Workers"
import { createWebhookHandler, type DedupeStore } from "stemsep-replicate";

interface Env {
  REPLICATE_WEBHOOK_SECRET: string;
}

// Stand-in for a shared store (KV, D1, Durable Object): isolates do not share memory.
declare const store: DedupeStore;

export default {
  async fetch(request: Request, env: Env): Promise<Response> {
    const handler = createWebhookHandler({
      secret: env.REPLICATE_WEBHOOK_SECRET,
      store,
      onCompleted: async ({ id, status, stems }) => {
        console.log(id, status, stems);
      },
    });
    return handler(request);
  },
};
