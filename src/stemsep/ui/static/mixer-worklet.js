// The stem mixer's audio: one AudioWorkletProcessor holds every stem's samples and plays
// them from ONE playhead, so the stems cannot drift apart. It applies each stem's gain
// (volume, mute and solo are folded into it by the page), loops a region, and slows the
// mix down with the pitch kept by WSOLA (waveform-similarity overlap-add) on the mixed
// signal. At speed 1 the samples pass straight through: sum of gain x stem, sample-exact.
//
// Messages in (port): reset {count, length}; stem {index, channels: [Float32Array]};
// gains {gains}; play; pause; seek {frame}; speed {speed}; loop {enabled, start, end};
// state (answered with a state message).
// Messages out: position {frame, playing} about 20 times a second while playing; ended.

const QUANTUM = 128;

class StemsepMixer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.stems = []; // per stem: its channels (Float32Array each, 1 or 2)
    this.gains = []; // per stem: volume, or 0 when muted or another stem is soloed
    this.length = 0;
    this.frame = 0; // the playhead in source frames (fractional while stretching)
    this.playing = false;
    this.speed = 1;
    this.loop = { enabled: false, start: 0, end: 0 };
    this.sinceReport = 0;
    // WSOLA: frames of ~46 ms with 50% overlap (periodic Hann windows sum to 1), a search
    // for the best-matching frame within +-N/4 of where the playhead says it should start.
    this.N = 2 ** Math.round(Math.log2(sampleRate * 0.046));
    this.H = this.N / 2;
    this.S = this.N / 4;
    this.window = new Float32Array(this.N);
    for (let n = 0; n < this.N; n++) this.window[n] = 0.5 - 0.5 * Math.cos((2 * Math.PI * n) / this.N);
    this.acc = [new Float32Array(this.N), new Float32Array(this.N)];
    this.out = [new Float32Array(this.H), new Float32Array(this.H)];
    this.outRead = this.H; // nothing ready
    this.previous = null; // source start of the last frame added
    this.monoNatural = new Float32Array(this.H);
    this.monoSearch = new Float32Array(2 * this.S + this.H);
    this.port.onmessage = (event) => this.receive(event.data);
  }

  receive(m) {
    switch (m.type) {
      case "reset":
        this.stems = new Array(m.count).fill(null);
        this.gains = new Array(m.count).fill(1);
        this.length = m.length;
        this.playing = false;
        this.seek(0);
        break;
      case "stem":
        this.stems[m.index] = m.channels;
        break;
      case "gains":
        this.gains = m.gains.slice();
        break;
      case "play":
        if (this.frame >= this.end()) this.seek(this.loop.enabled ? this.loop.start : 0);
        this.playing = true;
        this.report();
        break;
      case "pause":
        this.playing = false;
        this.report();
        break;
      case "seek":
        this.seek(m.frame);
        this.report();
        break;
      case "speed":
        this.speed = m.speed;
        this.seek(this.frame);
        break;
      case "loop":
        this.loop = { enabled: m.enabled, start: Math.max(0, m.start), end: Math.min(this.length, m.end) };
        if (this.loop.end <= this.loop.start) this.loop = { enabled: m.enabled, start: 0, end: this.length };
        break;
      case "state":
        this.port.postMessage({
          type: "state", gains: this.gains.slice(), playing: this.playing, frame: this.frame, speed: this.speed,
          loop: { ...this.loop }, length: this.length, stems: this.stems.filter((s) => s !== null).length,
        });
        break;
    }
  }

  seek(frame) {
    this.frame = Math.max(0, Math.min(this.length, Math.round(frame)));
    this.acc[0].fill(0);
    this.acc[1].fill(0);
    this.outRead = this.H;
    this.previous = null;
  }

  end() {
    return this.loop.enabled ? this.loop.end : this.length;
  }

  report() {
    this.sinceReport = 0;
    this.port.postMessage({ type: "position", frame: this.frame, playing: this.playing });
  }

  // The mix of channel c (0 or 1) at source frame i; 0 outside the song.
  sample(c, i) {
    if (i < 0 || i >= this.length) return 0;
    const g = this.gains;
    let sum = 0;
    for (let s = 0; s < this.stems.length; s++) {
      const channels = this.stems[s];
      if (channels === null || g[s] === 0) continue;
      sum += g[s] * channels[Math.min(c, channels.length - 1)][i];
    }
    return sum;
  }

  mono(i) {
    return this.sample(0, i) + this.sample(1, i);
  }

  process(inputs, outputs) {
    const output = outputs[0];
    const left = output[0];
    const right = output.length > 1 ? output[1] : null;
    if (!this.playing || this.stems.length === 0) return true;
    for (let i = 0; i < QUANTUM; i++) {
      let l, r;
      if (this.speed === 1) {
        if (this.frame >= this.end()) {
          if (!this.loop.enabled) {
            this.stop();
            break;
          }
          this.frame = this.loop.start;
        }
        l = this.sample(0, this.frame);
        r = this.sample(1, this.frame);
        this.frame += 1;
      } else {
        if (this.outRead === this.H) {
          if (!this.loop.enabled && this.frame >= this.length) {
            this.stop();
            break;
          }
          this.stretchStep();
        }
        l = this.out[0][this.outRead];
        r = this.out[1][this.outRead];
        this.outRead += 1;
      }
      left[i] = l;
      if (right) right[i] = r;
    }
    if (++this.sinceReport >= Math.round((0.05 * sampleRate) / QUANTUM)) this.report();
    return true;
  }

  stop() {
    this.playing = false;
    this.frame = this.length;
    this.report();
    this.port.postMessage({ type: "ended" });
  }

  // One WSOLA step: add the source frame that best continues the last one, near the
  // playhead, and hand out the H output samples that are now complete.
  stretchStep() {
    const { N, H, S } = this;
    const target = Math.round(this.frame);
    let start = target;
    if (this.previous !== null) start = this.bestStart(this.previous + H, target);
    for (let c = 0; c < 2; c++) {
      const acc = this.acc[c];
      for (let n = 0; n < N; n++) acc[n] += this.window[n] * this.sample(c, start + n);
      this.out[c].set(acc.subarray(0, H));
      acc.copyWithin(0, H);
      acc.fill(0, N - H);
    }
    this.outRead = 0;
    this.previous = start;
    this.frame += H * this.speed;
    if (this.loop.enabled && this.frame >= this.loop.end) this.frame -= this.loop.end - this.loop.start;
  }

  // The start within target +- S whose first H samples best match (normalized cross-
  // correlation of the mono mix) the H samples that naturally follow the last frame:
  // every 4th offset on every 4th sample first, then each offset around the best.
  bestStart(natural, target) {
    const { H, S } = this;
    for (let n = 0; n < H; n++) this.monoNatural[n] = this.mono(natural + n);
    const base = target - S;
    for (let n = 0; n < this.monoSearch.length; n++) this.monoSearch[n] = this.mono(base + n);
    const score = (offset, step) => {
      let dot = 0;
      let energy = 1e-9;
      for (let n = 0; n < H; n += step) {
        const x = this.monoSearch[offset + n];
        dot += x * this.monoNatural[n];
        energy += x * x;
      }
      return dot / Math.sqrt(energy);
    };
    let best = S;
    let bestScore = -Infinity;
    for (let offset = 0; offset <= 2 * S; offset += 4) {
      const value = score(offset, 4);
      if (value > bestScore) [best, bestScore] = [offset, value];
    }
    const coarse = best;
    bestScore = -Infinity;
    for (let offset = Math.max(0, coarse - 3); offset <= Math.min(2 * S, coarse + 3); offset++) {
      const value = score(offset, 1);
      if (value > bestScore) [best, bestScore] = [offset, value];
    }
    return base + best;
  }
}

registerProcessor("stemsep-mixer", StemsepMixer);
