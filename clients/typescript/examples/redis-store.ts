// docs/typescript.md, "A shared dedupe store": a DedupeStore on Redis (node-redis v4 style).
import type { DedupeStore } from "stemsep-replicate";

// The three calls used, as node-redis v4 types them (`createClient()` from "redis").
interface RedisLike {
  set(key: string, value: string, options: { NX?: boolean; EX?: number }): Promise<string | null>;
  get(key: string): Promise<string | null>;
  del(key: string): Promise<number>;
}

export function redisDedupeStore(redis: RedisLike, prefix = "replicate-webhook:"): DedupeStore {
  return {
    async begin(id) {
      // SET NX is atomic: exactly one delivery of an id gets "new".
      if ((await redis.set(prefix + id, "processing", { NX: true, EX: 600 })) === "OK") return "new";
      return (await redis.get(prefix + id)) === "done" ? "done" : "processing";
    },
    async finish(id) {
      await redis.set(prefix + id, "done", { EX: 7 * 24 * 3600 });
    },
    async abort(id) {
      await redis.del(prefix + id);
    },
  };
}
