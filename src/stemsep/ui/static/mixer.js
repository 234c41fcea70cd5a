// The stem mixer on the page: decodes each stem with Web Audio (at the stems' own sample
// rate, so nothing is resampled), draws its waveform, and hands the samples to the one
// AudioWorkletNode of mixer-worklet.js, which plays them all from one playhead. This file
// owns the controls: transport (play/pause, space bar, seek, loop region, speed) and per
// stem volume, mute and solo, folded into one gain per stem for the worklet.

const PEAKS = 1600; // waveform columns per stem

export class Mixer {
  constructor(root) {
    this.root = root;
    this.el = (selector) => root.querySelector(selector);
    this.context = null;
    this.node = null;
    this.rows = [];
    this.length = 0;
    this.peakScale = 1;
    this.rate = 44100;
    this.frame = 0;
    this.playing = false;
    this.region = null; // [start, end] frames of the loop region, or null for the whole song
    this.waiting = new Map(); // message type -> resolve, for answers from the worklet
    this.bindTransport();
  }

  // Open a separation's record: decode its stems and show a row for each. Returns a
  // sentence when the mixer cannot play it (the downloads are shown all the same).
  async open(record, limitMinutes) {
    await this.close();
    this.record = record;
    this.el("#mixer-title").textContent = `${record.song} (${record.model})`;
    this.el("#zip").href = `/api/separations/${encodeURIComponent(record.id)}/zip`;
    this.root.hidden = false;
    const stems = Object.entries(record.stems);
    const rowsBox = this.el("#stem-rows");
    rowsBox.replaceChildren();
    this.rows = stems.map(([name, file], index) => this.makeRow(name, file, index));
    rowsBox.append(...this.rows.map((row) => row.element));
    if (record.duration_s && record.duration_s > limitMinutes * 60) {
      this.setPlayable(false);
      return `This song is ${clock(record.duration_s)} long, over the mixer's ${limitMinutes}-minute limit: download the stems to play them.`;
    }
    this.setPlayable(false);
    this.context = makeContext(record.sample_rate);
    this.rate = this.context.sampleRate;
    await this.context.audioWorklet.addModule("/static/mixer-worklet.js");
    this.node = new AudioWorkletNode(this.context, "stemsep-mixer", {
      numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [2],
    });
    this.node.port.onmessage = (event) => this.receive(event.data);
    this.node.connect(this.context.destination);
    const decoded = [];
    for (const row of this.rows) {
      const response = await fetch(row.url);
      if (!response.ok) throw new Error(`${row.file}: could not be read from the server (HTTP ${response.status})`);
      const buffer = await this.context.decodeAudioData(await response.arrayBuffer());
      const channels = [];
      for (let c = 0; c < Math.min(2, buffer.numberOfChannels); c++) channels.push(buffer.getChannelData(c).slice());
      row.peaks = peaks(channels, PEAKS);
      decoded.push(channels);
    }
    this.length = Math.max(...decoded.map((channels) => channels[0].length));
    this.peakScale = 1 / Math.max(1e-6, ...this.rows.map((row) => Math.max(...row.peaks))); // loudest stem fills its row
    this.node.port.postMessage({ type: "reset", count: decoded.length, length: this.length });
    decoded.forEach((channels, index) => {
      this.node.port.postMessage({ type: "stem", index, channels }, channels.map((x) => x.buffer));
    });
    this.region = null;
    this.frame = 0;
    this.sendGains();
    this.sendLoop();
    this.node.port.postMessage({ type: "speed", speed: Number(this.el("#speed").value) });
    this.setPlayable(true);
    this.updateTransport();
    return null;
  }

  async close() {
    this.playing = false;
    this.updateTransport();
    if (this.context) await this.context.close();
    this.context = null;
    this.node = null;
  }

  makeRow(name, file, index) {
    const element = document.createElement("div");
    element.className = "stem";
    element.dataset.stem = name;
    const url = `/files/${encodeURIComponent(this.record.id)}/${encodeURIComponent(file)}`;
    element.innerHTML = `
      <div class="stem-head">
        <span class="stem-name"></span>
        <button type="button" class="mute" aria-pressed="false" title="Mute">M</button>
        <button type="button" class="solo" aria-pressed="false" title="Solo">S</button>
        <input type="range" class="volume" min="0" max="1.5" step="0.01" value="1">
        <a class="download" download>Download</a>
      </div>
      <canvas class="wave" height="64"></canvas>`;
    const row = { name, file, index, url, element, peaks: null, muted: false, soloed: false };
    element.querySelector(".stem-name").textContent = name;
    const volume = element.querySelector(".volume");
    volume.setAttribute("aria-label", `${name} volume`);
    const link = element.querySelector(".download");
    link.href = url;
    link.setAttribute("download", file);
    link.title = file;
    row.canvas = element.querySelector(".wave");
    row.volume = volume;
    const toggle = (button, key) => {
      button.addEventListener("click", () => {
        row[key] = !row[key];
        button.setAttribute("aria-pressed", String(row[key]));
        this.sendGains();
      });
    };
    toggle(element.querySelector(".mute"), "muted");
    toggle(element.querySelector(".solo"), "soloed");
    volume.addEventListener("input", () => this.sendGains());
    this.bindWaveform(row.canvas);
    return row;
  }

  // One gain per stem: its volume, unless muted or another stem is soloed.
  gains() {
    const soloing = this.rows.some((row) => row.soloed);
    return this.rows.map((row) => (row.muted || (soloing && !row.soloed) ? 0 : Number(row.volume.value)));
  }

  sendGains() {
    if (this.node) this.node.port.postMessage({ type: "gains", gains: this.gains() });
  }

  sendLoop() {
    const [start, end] = this.region || [0, this.length];
    this.node?.port.postMessage({ type: "loop", enabled: this.el("#loop").checked, start, end });
  }

  // The worklet's own state (gains, playhead...): a debugging and testing aid.
  state() {
    return this.ask("state");
  }

  ask(type) {
    if (!this.node) return Promise.resolve(null);
    return new Promise((resolve) => {
      this.waiting.set(type, resolve);
      this.node.port.postMessage({ type });
    });
  }

  receive(message) {
    if (message.type === "position") {
      this.frame = message.frame;
      this.playing = message.playing;
      this.updateTransport();
    } else if (message.type === "ended") {
      this.playing = false;
      this.updateTransport();
    }
    const resolve = this.waiting.get(message.type);
    if (resolve) {
      this.waiting.delete(message.type);
      resolve(message);
    }
  }

  async togglePlay() {
    if (!this.node) return;
    if (this.playing) {
      this.node.port.postMessage({ type: "pause" });
    } else {
      await this.context.resume();
      this.node.port.postMessage({ type: "play" });
    }
  }

  seekTo(frame) {
    this.frame = Math.max(0, Math.min(this.length, Math.round(frame)));
    this.node?.port.postMessage({ type: "seek", frame: this.frame });
    this.updateTransport();
  }

  bindTransport() {
    this.el("#play").addEventListener("click", () => this.togglePlay());
    this.el("#seek").addEventListener("input", (event) => {
      this.seekTo((Number(event.target.value) / 1000) * this.length);
    });
    this.el("#loop").addEventListener("change", () => this.sendLoop());
    this.el("#clear-loop").addEventListener("click", () => {
      this.region = null;
      this.sendLoop();
      this.draw();
    });
    const speed = this.el("#speed");
    speed.addEventListener("input", () => {
      this.el("#speed-value").textContent = `${Math.round(Number(speed.value) * 100)}%`;
      this.node?.port.postMessage({ type: "speed", speed: Number(speed.value) });
    });
    this.el("#export").addEventListener("click", () => this.exportMix());
    document.addEventListener("keydown", (event) => {
      if (event.code !== "Space" || !this.node || typing(event.target)) return;
      event.preventDefault();
      if (!event.repeat) this.togglePlay();
    });
    document.addEventListener("keyup", (event) => {
      if (event.code === "Space" && this.node && !typing(event.target)) event.preventDefault(); // no button click
    });
  }

  // Click a waveform to seek; drag across it to select a region, which loop plays.
  bindWaveform(canvas) {
    canvas.addEventListener("pointerdown", (down) => {
      if (!this.node) return;
      const frameAt = (event) => {
        const box = canvas.getBoundingClientRect();
        return Math.max(0, Math.min(1, (event.clientX - box.left) / box.width)) * this.length;
      };
      const from = frameAt(down);
      canvas.setPointerCapture(down.pointerId);
      const move = (event) => {
        if (Math.abs(event.clientX - down.clientX) < 4) return;
        const to = frameAt(event);
        this.region = [Math.min(from, to), Math.max(from, to)];
        this.draw();
      };
      const up = (event) => {
        canvas.removeEventListener("pointermove", move);
        canvas.removeEventListener("pointerup", up);
        if (Math.abs(event.clientX - down.clientX) < 4) {
          this.seekTo(from);
        } else {
          this.el("#loop").checked = true;
          this.sendLoop();
          this.seekTo(this.region[0]);
        }
      };
      canvas.addEventListener("pointermove", move);
      canvas.addEventListener("pointerup", up);
    });
  }

  setPlayable(playable) {
    for (const id of ["#play", "#seek", "#loop", "#clear-loop", "#speed", "#export"]) this.el(id).disabled = !playable;
    this.el("#mixer-controls").classList.toggle("unplayable", !playable);
  }

  updateTransport() {
    this.el("#play").textContent = this.playing ? "Pause" : "Play";
    this.el("#play").setAttribute("aria-pressed", String(this.playing));
    const seconds = this.frame / this.rate;
    this.el("#time").textContent = `${clock(seconds)} / ${clock(this.length / this.rate)}`;
    if (this.length && document.activeElement !== this.el("#seek")) {
      this.el("#seek").value = String(Math.round((1000 * this.frame) / this.length));
    }
    this.draw();
  }

  draw() {
    for (const row of this.rows) {
      if (!row.peaks) continue;
      const canvas = row.canvas;
      const width = (canvas.width = canvas.clientWidth * devicePixelRatio || PEAKS);
      const height = (canvas.height = 64 * devicePixelRatio);
      const g = canvas.getContext("2d");
      g.clearRect(0, 0, width, height);
      if (this.region) {
        g.fillStyle = "rgba(255, 196, 0, 0.25)";
        const [a, b] = this.region.map((f) => (f / this.length) * width);
        g.fillRect(a, 0, b - a, height);
      }
      g.fillStyle = row.muted ? "#9aa3ad" : "#2f6fdf";
      for (let x = 0; x < width; x++) {
        const peak = row.peaks[Math.floor((x / width) * row.peaks.length)];
        const h = Math.max(1, peak * this.peakScale * height);
        g.fillRect(x, (height - h) / 2, 1, h);
      }
      g.fillStyle = "#d33";
      g.fillRect(Math.round((this.frame / this.length) * width), 0, Math.max(1, devicePixelRatio), height);
    }
  }

  // The mix as the sliders set it (volumes, mutes, solo; at speed 1), summed by the server
  // from the stem files: at unity gains, PCM stems give back the song bit for bit.
  exportMix() {
    const link = document.createElement("a");
    link.href = `/api/separations/${encodeURIComponent(this.record.id)}/mix?gains=${this.gains().join(",")}`;
    link.download = "";
    link.click();
  }
}

function makeContext(sampleRate) {
  try {
    if (sampleRate) return new AudioContext({ sampleRate, latencyHint: "playback" });
  } catch (error) {
    // a rate this browser cannot open: Web Audio resamples the stems to its own
  }
  return new AudioContext({ latencyHint: "playback" });
}

function typing(target) {
  return target instanceof HTMLElement && target.matches("input[type=text], input[type=number], input[type=password], textarea, select");
}

// The largest absolute sample of each of `count` columns, over the channels.
function peaks(channels, count) {
  const n = channels[0].length;
  const out = new Float32Array(count);
  for (let k = 0; k < count; k++) {
    const from = Math.floor((k * n) / count);
    const to = Math.max(from + 1, Math.floor(((k + 1) * n) / count));
    let peak = 0;
    for (const channel of channels) {
      for (let i = from; i < to && i < n; i++) peak = Math.max(peak, Math.abs(channel[i]));
    }
    out[k] = Math.min(1, peak);
  }
  return out;
}

export function clock(seconds) {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${rest}` : `${m}:${rest}`;
}
