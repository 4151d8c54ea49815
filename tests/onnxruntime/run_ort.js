// Runs an ONNX model in ONNX Runtime's CPU execution provider on a raw float32 input file.
//
//   node run_ort.js MODEL INPUT NxCxHxW OUTPUT [THREADS]
//     writes the graph's "output" to OUTPUT as raw float32.
//   node run_ort.js MODEL --bench NxCxHxW THREADS SECONDS
//     times session.run on one fixed input and prints "images_per_s <v> ms_per_run <v>" (median of
//     5 timed windows, after a warm-up).
'use strict';
const fs = require('fs');
const ort = require('onnxruntime-node');

function parseDims(s) {
  const dims = s.split('x').map(Number);
  if (dims.some((d) => !Number.isInteger(d) || d < 1)) throw new Error(`bad dims ${s}`);
  return dims;
}

async function session(model, threads) {
  return ort.InferenceSession.create(model, {
    executionProviders: ['cpu'],
    intraOpNumThreads: threads,
    interOpNumThreads: 1,
    graphOptimizationLevel: 'all',
  });
}

async function run(model, input, dimsText, output, threads) {
  const dims = parseDims(dimsText);
  const bytes = fs.readFileSync(input);
  const count = dims.reduce((a, b) => a * b, 1);
  if (bytes.length !== 4 * count) throw new Error(`${input}: ${bytes.length} bytes, expected ${4 * count}`);
  const data = new Float32Array(bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length));
  const s = await session(model, threads);
  const out = await s.run({ input: new ort.Tensor('float32', data, dims) });
  const y = out.output.data;
  fs.writeFileSync(output, Buffer.from(y.buffer, y.byteOffset, y.byteLength));
}

async function bench(model, dimsText, threads, seconds) {
  const dims = parseDims(dimsText);
  const count = dims.reduce((a, b) => a * b, 1);
  const data = new Float32Array(count);
  for (let i = 0; i < count; ++i) data[i] = Math.sin(i);
  const s = await session(model, threads);
  const feeds = { input: new ort.Tensor('float32', data, dims) };
  for (let i = 0; i < 5; ++i) await s.run(feeds);
  const windows = [];
  for (let w = 0; w < 5; ++w) {
    let runs = 0;
    const t0 = process.hrtime.bigint();
    let t = t0;
    while (Number(t - t0) < (seconds * 1e9) / 5) {
      await s.run(feeds);
      ++runs;
      t = process.hrtime.bigint();
    }
    windows.push(Number(t - t0) / 1e6 / runs);
  }
  windows.sort((a, b) => a - b);
  const ms = windows[2];
  console.log(`images_per_s ${((dims[0] * 1000) / ms).toFixed(1)} ms_per_run ${ms.toFixed(4)}`);
}

const args = process.argv.slice(2);
const job = args[1] === '--bench'
  ? bench(args[0], args[2], Number(args[3] || 1), Number(args[4] || 5))
  : run(args[0], args[1], args[2], args[3], Number(args[4] || 1));
job.catch((e) => {
  console.error(e.message || e);
  process.exit(1);
});
