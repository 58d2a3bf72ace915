"""The page ``GET /`` serves: upload a song or a token file, hear the decode as it streams in.

Audio is encoded first (``/v1/encode``), token files (``.mct``, ``.npy``) go straight to ``/v1/decode``. The
float WAV stream is played with the Web Audio API as its bytes arrive: each whole frame received is
scheduled right after the previous ones, so playback starts after the first window. The page shows the time
to first audio and the real-time factor (decode time / audio length).
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>MuCodec</title>
<style>body{font:16px system-ui,sans-serif;max-width:40em;margin:2em auto}label{margin-right:1em}
output{display:block;margin-top:1em;font-family:monospace;white-space:pre}</style></head>
<body><h1>MuCodec</h1>
<p>Upload a song (it is encoded, then decoded) or a token file (.mct, .npy); the audio plays as it streams in.</p>
<form id="f"><input type="file" id="file" required>
<label>steps <input id="steps" type="number" min="1" max="1000" value="20" style="width:4em"></label>
<label>seed <input id="seed" type="number" min="0" style="width:8em"></label>
<label>API key <input id="key" type="password" style="width:8em"></label>
<button>Decode</button></form>
<output id="out"></output>
<script>
const out = document.getElementById("out");
function say(s) { out.textContent = s; }
function headers() {
  const k = document.getElementById("key").value;
  return k ? {"Authorization": "Bearer " + k} : {};
}
async function refuse(r) { if (!r.ok) throw new Error(r.status + ": " + (await r.text())); return r; }
function dataStart(b) {  // offset of the samples: the chunks of a RIFF file are walked to "data"
  const v = new DataView(b.buffer, b.byteOffset);
  for (let at = 12; at + 8 <= b.length;) {
    const id = String.fromCharCode(...b.slice(at, at + 4)), size = v.getUint32(at + 4, true);
    if (id === "data") return at + 8;
    at += 8 + size + (size & 1);
  }
  return -1;
}
document.getElementById("f").onsubmit = async (e) => {
  e.preventDefault();
  const file = document.getElementById("file").files[0];
  const ctx = new AudioContext({sampleRate: 48000});
  const q = new URLSearchParams({steps: document.getElementById("steps").value, format: "wav"});
  const seed = document.getElementById("seed").value;
  if (seed !== "") q.set("seed", seed);
  try {
    let body = file;
    if (!/\\.(mct|npy)$/i.test(file.name)) {
      say("encoding " + file.name + " ...");
      body = await (await refuse(await fetch("/v1/encode", {method: "POST", body: file, headers: headers()}))).blob();
    }
    say("decoding ...");
    const t0 = performance.now();
    const r = await refuse(await fetch("/v1/decode?" + q, {method: "POST", body, headers: headers()}));
    const reader = r.body.getReader();
    let pending = new Uint8Array(0), start = -1, next = 0, frames = 0, first = null;
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      const joined = new Uint8Array(pending.length + value.length);
      joined.set(pending); joined.set(value, pending.length); pending = joined;
      if (start < 0) { start = dataStart(pending); if (start < 0) continue; pending = pending.slice(start); }
      const n = Math.floor(pending.length / 8);  // float32 stereo frames
      if (!n) continue;
      const samples = new Float32Array(pending.slice(0, n * 8).buffer);
      pending = pending.slice(n * 8);
      const buf = ctx.createBuffer(2, n, 48000);
      for (let c = 0; c < 2; c++) {
        const ch = buf.getChannelData(c);
        for (let i = 0; i < n; i++) ch[i] = samples[2 * i + c];
      }
      const src = ctx.createBufferSource();
      src.buffer = buf; src.connect(ctx.destination);
      next = Math.max(next, ctx.currentTime + 0.05); src.start(next); next += n / 48000;
      frames += n;
      window.playback = {state: ctx.state, frames};  // what a browser test reads
      if (first === null) first = (performance.now() - t0) / 1000;
      say("playing; time to first audio " + first.toFixed(2) + " s; " + (frames / 48000).toFixed(1) + " s received");
    }
    const total = (performance.now() - t0) / 1000;
    say("time to first audio " + first.toFixed(2) + " s\\nreal-time factor " + (total / (frames / 48000)).toFixed(3) +
        " (" + total.toFixed(1) + " s for " + (frames / 48000).toFixed(1) + " s of audio, seed " +
        r.headers.get("X-Seed") + ")");
  } catch (err) { say(String(err)); }
};
</script></body></html>
"""
