/**
 * What a prediction gives back: when it has ended, and which output URL is which stem.
 *
 * The model returns one file per stem, `<song>_<stem>.<ext>`, in the chosen model's stem
 * order (only the stems asked for, when the `stems` input names some). On Replicate the
 * list arrives in upload-completion order, so a stem is told by its file name, by the
 * same rule as stemsep's Python client (`stemsep/remote/outputs.py`):
 *
 * 1. When the stems that can come back are known, the stem is the longest known one that
 *    the file name ends with as `_<stem>.<ext>`. They are known when the prediction's
 *    `model` input (default `DEFAULT_MODEL`) is a model of `MODEL_STEMS`: its stems, and
 *    `no_<stem>` for each (stem names may hold underscores: `lead_vocals`, `no_guitar`).
 * 2. Otherwise a name ending in `_no_<x>.<ext>` is stem `no_<x>`, and any other the text
 *    after its last underscore.
 * 3. Outputs that carry no file name (data URLs, from a Cog server without an upload URL)
 *    take the order the model documents: of its stems and then its `no_<stem>` practice
 *    tracks, in the model's stem order, those the `stems` input asks for. When that is
 *    not known either, the output is refused.
 *
 * `MODEL_STEMS` and `DEFAULT_MODEL` are written from stemsep's model catalogue when the
 * package is built (`scripts/catalogue.mjs`). `TERMINAL_STATUSES` is a JSON literal that
 * stemsep's Python tests check against the Python side's.
 */

import { DEFAULT_MODEL, MODEL_STEMS } from "./catalogue.generated.js";
import { StemsepError } from "./errors.js";

export { DEFAULT_MODEL, MODEL_STEMS };

/** Statuses after which a prediction never changes again. */
export const TERMINAL_STATUSES = ["succeeded", "failed", "canceled", "aborted"] as const;

export type TerminalStatus = (typeof TERMINAL_STATUSES)[number];

/** Whether a prediction with this status has ended. */
export function isTerminal(status: string): status is TerminalStatus {
  return (TERMINAL_STATUSES as readonly string[]).includes(status);
}

/** `{ vocals: url, instrumental: url }` for the default model; one entry per stem returned. */
export type Stems = Record<string, string>;

/** A prediction's inputs, as sent (only `model` and `stems` matter here). */
export type Inputs = Record<string, unknown> | null | undefined;

const STEM_NAME = /^[a-z0-9][a-z0-9_-]*$/; // what a stem may be called: also part of a file name

// what the model says it returns ------------------------------------------------------------

/** The stems of the catalogue model that the `model` input names (`DEFAULT_MODEL` when none); `null` for an unknown one. */
export function modelStems(input?: Inputs): readonly string[] | null {
  const name = input?.model || DEFAULT_MODEL;
  return typeof name === "string" && Object.hasOwn(MODEL_STEMS, name) ? MODEL_STEMS[name]! : null;
}

/**
 * The stems the prediction returns, in the order the model documents: the model's stems, or
 * when the comma-separated `stems` input names any, those of `knownStems` it names, in that
 * order (the model's stems, then the `no_<stem>` practice tracks); `null` for an unknown model.
 */
export function expectedStems(input?: Inputs): readonly string[] | null {
  const stems = modelStems(input);
  const chosen = input?.stems;
  if (stems === null || typeof chosen !== "string" || !chosen.trim()) return stems;
  const wanted = new Set(chosen.split(",").map((s) => s.trim()));
  return knownStems(input)!.filter((s) => wanted.has(s));
}

/** Every stem name the outputs can carry, in the order they come: the model's stems, then `no_<stem>` for each; `null` for an unknown model. */
export function knownStems(input?: Inputs): readonly string[] | null {
  const stems = modelStems(input);
  return stems === null ? null : [...new Set([...stems, ...stems.map((s) => `no_${s}`)])];
}

// the naming rule ---------------------------------------------------------------------------

/**
 * The stem an output file `<song>_<stem>.<ext>` holds (see the rule above): the longest of
 * `known` it ends with, else `no_<x>` or the part after the last underscore; `null` for a
 * name of another shape (`vocals.wav` names no song).
 */
export function fileStem(fileName: string, known?: readonly string[] | null): string | null {
  const match = /^(.+)\.[A-Za-z0-9]{1,8}$/.exec(fileName);
  if (!match) return null;
  const base = match[1]!.toLowerCase();
  for (const stem of [...(known ?? [])].sort((a, b) => b.length - a.length)) {
    if (base.length > stem.length + 1 && base.endsWith(`_${stem}`)) return stem;
  }
  const cut = base.lastIndexOf("_");
  const head = base.slice(0, Math.max(cut, 0));
  const last = base.slice(cut + 1);
  if (!head || !/^[a-z0-9-]+$/.test(last)) return null;
  return head.endsWith("_no") && head.length > 3 ? `no_${last}` : last;
}

/**
 * `fileStem` of an output URL's file name (`https://.../my%20song_no_guitar.wav?sig=1` is
 * `no_guitar`); `null` for a data URL, which carries no name.
 */
export function stemOf(url: string, known?: readonly string[] | null): string | null {
  if (url.startsWith("data:")) return null;
  let path: string;
  try {
    path = new URL(url).pathname;
  } catch {
    path = url.split(/[?#]/, 1)[0] ?? "";
  }
  try {
    path = decodeURIComponent(path);
  } catch {
    // keep it encoded
  }
  return fileStem(path.slice(path.lastIndexOf("/") + 1), known);
}

/**
 * One output item as a URL string. Accepts what `replicate.run` gives back: a string (a
 * client with `useFileOutput: false`, or an `http:` URL, which replicate never wraps), a
 * `FileOutput` (whose `.url()` returns a `URL`), or a `URL`.
 */
export function outputUrl(item: unknown): string {
  if (typeof item === "string") return item;
  if (item instanceof URL) return item.href;
  if (item && typeof (item as { url?: unknown }).url === "function") {
    const url = (item as { url: () => unknown }).url();
    if (url instanceof URL) return url.href;
    if (typeof url === "string") return url;
  }
  throw new StemsepError(`the prediction's output holds something other than a URL: ${short(item)}`);
}

/** Whether an output item is a `URL` or a `FileOutput`, rather than a mapping of stems. */
function isFileLike(value: object): boolean {
  return value instanceof URL || typeof (value as { url?: unknown }).url === "function";
}

function short(value: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(value) ?? String(value);
  } catch {
    text = String(value);
  }
  return text.length <= 80 ? text : `${text.slice(0, 77)}...`;
}

/**
 * A prediction's output as `{stem: url}`, for any model and any choice of stems.
 *
 * `input` is the prediction's input (`model` and `stems` tell which stems can come back). A
 * list of URLs is mapped by file name; only when the names do not tell every output apart
 * (data URLs) does the model's documented order decide. The result follows the documented
 * order where it is known, else the output's order. A `{stem: url}` object is taken as it is.
 */
export function stemsFromOutput(output: unknown, input?: Inputs): Stems {
  if (output && typeof output === "object" && !Array.isArray(output) && !isFileLike(output)) {
    const entries = Object.entries(output as Record<string, unknown>).map(([k, v]) => [k, outputUrl(v)] as const);
    if (entries.length === 0 || !entries.every(([stem]) => STEM_NAME.test(stem))) {
      throw new StemsepError(`the prediction's output is not a mapping of stem names to URLs but ${short(output)}`);
    }
    return checked(Object.fromEntries(entries), output);
  }
  if (!Array.isArray(output) || output.length === 0) {
    throw new StemsepError(`the prediction's output is not a list of stem URLs but ${short(output)}`);
  }
  const urls = checked(output.map(outputUrl), output);
  const order = expectedStems(input);
  const known = knownStems(input);
  const names = urls.map((url) => stemOf(url, known));
  if (names.every((n) => n !== null) && new Set(names).size === names.length) {
    const rank = new Map((order ?? []).map((stem, i) => [stem, i] as const));
    const pairs = urls.map((url, i) => [names[i]!, url] as const);
    const position = (stem: string) => rank.get(stem) ?? rank.size;
    return Object.fromEntries([...pairs].sort((a, b) => position(a[0]) - position(b[0])));
  }
  if (order !== null && order.length === urls.length) {
    return Object.fromEntries(order.map((stem, i) => [stem, urls[i]!] as const));
  }
  const model = String(input?.model || DEFAULT_MODEL);
  const reason =
    order === null
      ? `model '${model}' is not in the catalogue, so its stem order is unknown`
      : `model '${model}' documents ${order.length} of them, not ${urls.length}`;
  throw new StemsepError(
    `cannot tell which stem each of the prediction's ${urls.length} outputs is: their file names do not say and ${reason}`,
  );
}

function checked<T extends string[] | Stems>(urls: T, output: unknown): T {
  const values: string[] = Array.isArray(urls) ? urls : Object.values(urls);
  if (!values.every((url) => /^(https?:\/\/|data:)/.test(url))) {
    throw new StemsepError(`the prediction's output holds something other than URLs: ${short(output)}`);
  }
  return urls;
}
