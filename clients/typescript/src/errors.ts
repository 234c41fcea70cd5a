/** The errors this package throws on purpose. */

/** Every error this package throws on purpose; `message` is one sentence. */
export class StemsepError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "StemsepError";
  }
}

/** The prediction could not be created, or it ended in failure, cancellation or abort. */
export class PredictionError extends StemsepError {
  readonly predictionId: string | null;
  readonly status: string | null;

  constructor(message: string, predictionId: string | null = null, status: string | null = null) {
    super(message);
    this.name = "PredictionError";
    this.predictionId = predictionId;
    this.status = status;
  }
}

/** A stem's output URL could not be fetched: it names the stem, the URL and the HTTP status. */
export class StemFetchError extends StemsepError {
  readonly stem: string;
  readonly url: string;
  readonly status: number | null;

  constructor(stem: string, url: string, status: number | null, detail: string) {
    super(`${stem}: could not fetch ${url}: ${detail}`);
    this.name = "StemFetchError";
    this.stem = stem;
    this.url = url;
    this.status = status;
  }
}
