#!/usr/bin/env node
// Reference benchmark: llama.cpp (via node-llama-cpp prebuilt CPU binaries) serving a GGUF model.
//
//   node bench.mjs --threads 1 --json out.json
//
// Options (all optional):
//   --threads N          CPU threads for llama.cpp (default 1)
//   --json FILE          write results JSON to FILE (default results.json)
//   --model PATH         GGUF file (required)
//   --prompt-tokens N    single-stream prompt length (default 64)
//   --gen-tokens N       tokens generated per stream (default 128)
//   --reps N             single-stream repetitions, median reported (default 3)
//   --parallel A,B       parallel sequence counts (default 8,32)
//   --par-reps N         repetitions per parallel config, median reported (default 1)
//   --min-prompt N / --max-prompt N   parallel prompt length range (default 32..256)
//   --batch-size N       llama.cpp n_batch for the parallel context (default: node-llama-cpp default)
//   --budget-s N         wall-time budget for the whole run (default 240). A parallel config is skipped if the
//                        budget is already spent, and a running one is cut short (marked "truncated") at the budget.
//
// Exact token counts: greedy sampling (temperature 0) with yieldEogToken: true, so an EOS/EOT token
// does not end the stream; generation is stopped by the benchmark after exactly --gen-tokens tokens.

import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import {execSync} from "node:child_process";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";


// ---------- args ----------
function parseArgs(argv) {
    const a = {
        threads: 1, json: "results.json", model: null, promptTokens: 64, genTokens: 128, reps: 3,
        parallel: [8, 32], parReps: 1, minPrompt: 32, maxPrompt: 256, batchSize: null, budgetS: 240
    };
    for (let i = 0; i < argv.length; i++) {
        const k = argv[i];
        const v = () => {
            const x = argv[++i];
            if (x == null) throw new Error(`missing value for ${k}`);
            return x;
        };
        switch (k) {
            case "--threads": a.threads = parseInt(v(), 10); break;
            case "--json": a.json = v(); break;
            case "--model": a.model = v(); break;
            case "--prompt-tokens": a.promptTokens = parseInt(v(), 10); break;
            case "--gen-tokens": a.genTokens = parseInt(v(), 10); break;
            case "--reps": a.reps = parseInt(v(), 10); break;
            case "--parallel": a.parallel = v().split(",").filter(Boolean).map((x) => parseInt(x, 10)); break;
            case "--par-reps": a.parReps = parseInt(v(), 10); break;
            case "--min-prompt": a.minPrompt = parseInt(v(), 10); break;
            case "--max-prompt": a.maxPrompt = parseInt(v(), 10); break;
            case "--batch-size": a.batchSize = parseInt(v(), 10); break;
            case "--budget-s": a.budgetS = parseFloat(v()); break;
            case "-h": case "--help":
                console.log(fs.readFileSync(new URL(import.meta.url), "utf8").split("\n").slice(1, 22).join("\n"));
                process.exit(0);
            default: throw new Error(`unknown option ${k}`);
        }
    }
    return a;
}
const args = parseArgs(process.argv.slice(2));
const here = path.dirname(new URL(import.meta.url).pathname);
if (!args.model) throw new Error("--model PATH (a GGUF file) is required");
const modelPath = args.model;

// ---------- helpers ----------
const now = () => performance.now();
// CPU seconds consumed by this process (all threads). Used to show how much CPU we actually got on a shared box.
const cpuSec = () => { const u = process.cpuUsage(); return (u.user + u.system) / 1e6; };
const median = (xs) => {
    const s = [...xs].sort((a, b) => a - b);
    const m = s.length >> 1;
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const mean = (xs) => xs.reduce((a, b) => a + b, 0) / xs.length;
const pct = (xs, p) => {
    const s = [...xs].sort((a, b) => a - b);
    return s[Math.min(s.length - 1, Math.max(0, Math.ceil(p / 100 * s.length) - 1))];
};
const r1 = (x) => Math.round(x * 10) / 10;
const r2 = (x) => Math.round(x * 100) / 100;
const log = (...m) => console.error("[bench]", ...m);

function sh(cmd) {
    try { return execSync(cmd, {encoding: "utf8", stdio: ["ignore", "pipe", "ignore"]}).trim(); } catch { return null; }
}
function pkgVersion(name) {
    // package "exports" may hide package.json from require(), so look it up on disk
    for (let dir = here; ; dir = path.dirname(dir)) {
        const f = path.join(dir, "node_modules", name, "package.json");
        if (fs.existsSync(f)) return JSON.parse(fs.readFileSync(f, "utf8")).version;
        if (path.dirname(dir) === dir) return null;
    }
}

// Deterministic source text for prompts (plain text, no chat template).
const CORPUS = [
    "The history of computing is a story of abstraction layered upon abstraction.",
    "Early machines were programmed by physically rewiring panels, and every new problem meant hours of manual work.",
    "Stored-program computers changed that: instructions became data, and data could be rewritten by other programs.",
    "Assemblers, compilers and operating systems followed, each hiding the details of the layer below.",
    "Today a developer can write a few lines of a high-level language and have them run on a phone, a server, or a tiny microcontroller.",
    "Language models are the newest layer in that stack.",
    "They turn text into tokens, tokens into vectors, and vectors into predictions about what text should come next.",
    "A small model with one hundred and thirty five million parameters can run comfortably on a single CPU core,",
    "which makes it useful for testing inference servers, measuring scheduling overhead, and comparing batching strategies.",
    "In this benchmark we feed the model prompts of different lengths and ask it to continue them greedily.",
    "Greedy decoding always picks the most likely token, so the output is deterministic for a given build and thread count.",
    "The numbers we report are throughput in tokens per second and latency until the first generated token.",
    "Throughput tells us how much work the server can do; latency tells us how responsive it feels to a single user.",
    "Both matter, and they often pull in opposite directions when many requests are served at once.",
    "Batching many sequences together amortises the cost of reading the weights from memory,",
    "but it also means that each individual request waits for the others in its batch.",
    "A careful scheduler balances these forces, admitting new requests quickly while keeping the batch full.",
    "Once upon a time, in a village by the sea, there lived an old clockmaker who repaired every clock in town.",
    "Each morning he opened his shop at seven, wound the great pendulum clock by the door, and brewed a pot of strong tea.",
    "Children would press their noses to the window to watch the tiny gears turn under his magnifying glass."
].join(" ");

function makePromptTokens(model, n, offset = 0) {
    const corpusTokens = Array.from(model.tokenize(CORPUS));
    const out = [];
    let i = offset % corpusTokens.length;
    while (out.length < n) {
        out.push(corpusTokens[i]);
        i = (i + 1) % corpusTokens.length;
    }
    return out;
}

// Generate exactly `genTokens` tokens greedily; returns timestamps.
let deadline = Infinity; // performance.now() value after which parallel generation is cut short
async function generate(sequence, promptTokens, genTokens, t0, {useDeadline = false} = {}) {
    const times = [];
    const tokens = [];
    let eogCount = 0;
    let truncated = false;
    for await (const token of sequence.evaluate(promptTokens, {temperature: 0, yieldEogToken: true})) {
        times.push(now() - t0);
        tokens.push(token);
        if (sequence.model.isEogToken(token)) eogCount++;
        if (tokens.length >= genTokens) break;
        if (useDeadline && now() > deadline) { truncated = true; break; }
    }
    if (tokens.length !== genTokens && !truncated) throw new Error(`generated ${tokens.length} tokens, expected ${genTokens}`);
    return {times, tokens, eogCount, truncated};
}

// ---------- main ----------
const loadavgAtStart = os.loadavg();
const tStart = now();
deadline = tStart + args.budgetS * 1000;
const llama = await getLlama({gpu: false, build: "never", maxThreads: args.threads, logLevel: LlamaLogLevel.warn, progressLogs: false});
const tLlama = now() - tStart;
log(`getLlama: ${r1(tLlama)} ms, gpu=${llama.gpu}, buildType=${llama.buildType}, cpuMathCores=${llama.cpuMathCores}, maxThreads=${llama.maxThreads}`);

const tm0 = now();
const model = await llama.loadModel({modelPath, gpuLayers: 0});
const tModel = now() - tm0;
log(`loadModel: ${r1(tModel)} ms, ${path.basename(modelPath)}, params=${model.fileInsights.totalParameters ?? "?"}`);

const threadsOpt = {ideal: args.threads, min: args.threads};
const results = {
    single: null,
    parallel: []
};

// ----- a) single stream -----
{
    const contextSize = args.promptTokens + args.genTokens + 64;
    const ctx = await model.createContext({contextSize, sequences: 1, threads: threadsOpt, flashAttention: false});
    const seq = ctx.getSequence();
    const prompt = makePromptTokens(model, args.promptTokens, 0);

    // warmup (not measured)
    await seq.evaluateWithoutGeneratingNewTokens(prompt.slice(0, 16));
    await seq.clearHistory();
    await generate(seq, prompt.slice(0, 16), 8, now());
    await seq.clearHistory();

    const reps = [];
    let sampleText = null;
    for (let r = 0; r < args.reps; r++) {
        // prompt processing only (prefill, no sampling)
        await seq.clearHistory();
        let t0 = now();
        await seq.evaluateWithoutGeneratingNewTokens(prompt);
        const ppMs = now() - t0;

        // full request: prefill + greedy decode of exactly genTokens tokens
        await seq.clearHistory();
        const c0 = cpuSec();
        t0 = now();
        const g = await generate(seq, prompt, args.genTokens, t0);
        const cpuS = cpuSec() - c0;
        const ttft = g.times[0];
        const decodeMs = g.times[g.times.length - 1] - g.times[0];
        const totalMs = g.times[g.times.length - 1];
        reps.push({
            pp_ms: ppMs, pp_tps: args.promptTokens / (ppMs / 1000),
            ttft_ms: ttft,
            decode_ms: decodeMs, decode_tps: (args.genTokens - 1) / (decodeMs / 1000),
            total_ms: totalMs, e2e_tps: args.genTokens / (totalMs / 1000),
            eog_tokens: g.eogCount,
            cpu_s: cpuS, cpu_util: cpuS / (totalMs / 1000)
        });
        if (r === 0) sampleText = model.detokenize(g.tokens);
        log(`single rep ${r + 1}/${args.reps}: pp ${r1(reps.at(-1).pp_tps)} t/s, ttft ${r1(ttft)} ms, decode ${r1(reps.at(-1).decode_tps)} t/s`);
    }
    results.single = {
        prompt_tokens: args.promptTokens, gen_tokens: args.genTokens, reps: args.reps, context_size: ctx.contextSize,
        batch_size: ctx.batchSize,
        median: {
            pp_tps: r1(median(reps.map((x) => x.pp_tps))),
            ttft_ms: r1(median(reps.map((x) => x.ttft_ms))),
            decode_tps: r1(median(reps.map((x) => x.decode_tps))),
            decode_ms_per_token: r2(median(reps.map((x) => x.decode_ms / (args.genTokens - 1)))),
            e2e_tps: r1(median(reps.map((x) => x.e2e_tps))),
            total_ms: r1(median(reps.map((x) => x.total_ms))),
            cpu_util: r2(median(reps.map((x) => x.cpu_util)))
        },
        runs: reps.map((x) => Object.fromEntries(Object.entries(x).map(([k, v]) => [k, r2(v)]))),
        sample_output: sampleText.slice(0, 300)
    };
    await ctx.dispose();
}

// ----- b) parallel sequences in one context -----
for (const n of args.parallel) {
    const maxPrompt = args.maxPrompt;
    const promptLens = Array.from({length: n}, (_, i) =>
        n === 1 ? args.minPrompt : Math.round(args.minPrompt + (maxPrompt - args.minPrompt) * i / (n - 1)));
    const contextSize = maxPrompt + args.genTokens + 64; // per sequence
    if (now() > deadline) {
        log(`parallel n=${n}: skipped, time budget (${args.budgetS} s) spent`);
        results.parallel.push({sequences: n, error: `skipped: --budget-s ${args.budgetS} spent`});
        continue;
    }
    let ctx;
    try {
        ctx = await model.createContext({
            contextSize, sequences: n, threads: threadsOpt, flashAttention: false,
            ...(args.batchSize != null ? {batchSize: args.batchSize} : {})
        });
    } catch (err) {
        log(`parallel n=${n}: createContext failed: ${err?.message ?? err}`);
        results.parallel.push({sequences: n, error: String(err?.message ?? err)});
        continue;
    }
    const seqs = Array.from({length: n}, () => ctx.getSequence());
    const prompts = promptLens.map((len, i) => makePromptTokens(model, len, i * 37));

    // warmup: one short batched step over all sequences
    await Promise.all(seqs.map((s, i) => generate(s, prompts[i].slice(0, 8), 2, now())));
    for (const s of seqs) await s.clearHistory();

    const reps = [];
    for (let r = 0; r < args.parReps; r++) {
        for (const s of seqs) await s.clearHistory();
        const c0 = cpuSec();
        const t0 = now();
        const gens = await Promise.all(seqs.map((s, i) => generate(s, prompts[i], args.genTokens, t0, {useDeadline: true})));
        const wallMs = now() - t0;
        const cpuS = cpuSec() - c0;
        const truncated = gens.some((g) => g.truncated);
        const started = gens.filter((g) => g.times.length > 0);
        const ttfts = started.map((g) => g.times[0]);
        const totalOut = gens.reduce((a, g) => a + g.tokens.length, 0);
        const totalIn = promptLens.reduce((a, b) => a + b, 0);
        const lastFirst = Math.max(...ttfts);
        // decode phase: after every sequence got its first token
        const decodeTokensAfter = gens.reduce((acc, g) => acc + g.times.filter((t) => t > lastFirst).length, 0);
        const rep = {
            wall_ms: wallMs,
            agg_out_tps: totalOut / (wallMs / 1000),
            agg_total_tps: (totalOut + totalIn) / (wallMs / 1000),
            decode_phase_tps: decodeTokensAfter / ((wallMs - lastFirst) / 1000),
            ttft_ms_min: Math.min(...ttfts), ttft_ms_median: median(ttfts), ttft_ms_mean: mean(ttfts),
            ttft_ms_p90: pct(ttfts, 90), ttft_ms_max: lastFirst,
            per_seq_decode_tps_median: median(started.filter((g) => g.times.length > 1).map((g) => (g.times.length - 1) / ((g.times.at(-1) - g.times[0]) / 1000))),
            per_seq_total_ms_median: median(started.map((g) => g.times.at(-1))),
            out_tokens: totalOut, seqs_started: started.length, truncated,
            eog_tokens: gens.reduce((a, g) => a + g.eogCount, 0),
            cpu_s: cpuS, cpu_util: cpuS / (wallMs / 1000),
            out_tokens_per_cpu_s: totalOut / cpuS,
            ttft_ms_by_seq: ttfts.map(r1)
        };
        reps.push(rep);
        if (truncated) log(`parallel n=${n}: TRUNCATED at --budget-s ${args.budgetS} (${totalOut}/${n * args.genTokens} tokens, ${started.length}/${n} seqs started)`);
        log(`parallel n=${n} rep ${r + 1}/${args.parReps}: wall ${r1(wallMs)} ms, agg out ${r1(rep.agg_out_tps)} t/s, ` +
            `TTFT min/med/max ${r1(rep.ttft_ms_min)}/${r1(rep.ttft_ms_median)}/${r1(lastFirst)} ms`);
    }
    // pick the median rep by wall time
    const sorted = [...reps].sort((a, b) => a.wall_ms - b.wall_ms);
    const med = sorted[(sorted.length - 1) >> 1];
    results.parallel.push({
        sequences: n, gen_tokens_per_seq: args.genTokens,
        prompt_tokens: {min: Math.min(...promptLens), max: Math.max(...promptLens), total: promptLens.reduce((a, b) => a + b, 0), lengths: promptLens},
        context_size_per_seq: ctx.contextSize, batch_size: ctx.batchSize, reps: args.parReps,
        ...Object.fromEntries(Object.entries(med).map(([k, v]) => [k, Array.isArray(v) || typeof v === "boolean" ? v : (k === "cpu_util" ? r2(v) : r1(v))])),
        all_reps_agg_out_tps: reps.map((x) => r1(x.agg_out_tps))
    });
    await ctx.dispose();
}

const llamaCppRelease = llama.llamaCppRelease;
const systemInfo = llama.systemInfo;
const buildType = llama.buildType;
const modelInfo = {
    path: modelPath, file_bytes: fs.statSync(modelPath).size, train_context: model.trainContextSize,
    name: model.fileInfo?.metadata?.general?.name ?? null, parameters: model.fileInsights.totalParameters ?? null
};
await model.dispose();
await llama.dispose();
const benchWallS = (now() - tStart) / 1000;

// ---------- machine / versions ----------
const cpuModel = os.cpus()[0]?.model ?? null;
const info = {
    timestamp: new Date().toISOString(),
    machine: {
        hostname: os.hostname(), platform: process.platform, arch: process.arch, kernel: os.release(),
        cpu_model: cpuModel, logical_cpus: os.cpus().length, nproc: parseInt(sh("nproc") ?? "0", 10) || null,
        total_mem_gib: r1(os.totalmem() / 2 ** 30), glibc: sh("ldd --version | head -1"),
        loadavg_at_start: loadavgAtStart.map(r2),
        loadavg_at_end: os.loadavg().map(r2)
    },
    versions: {
        node: process.version,
        "node-llama-cpp": pkgVersion("node-llama-cpp"),
        "@node-llama-cpp/linux-x64": pkgVersion("@node-llama-cpp/linux-x64"),
        llama_cpp_release: llamaCppRelease,
        build_type: buildType,
        system_info: systemInfo
    },
    model: modelInfo,
    config: {threads: args.threads, ...args, json: undefined, sampling: "greedy (temperature 0), yieldEogToken=true, flashAttention=false"},
    timings: {get_llama_ms: r1(tLlama), load_model_ms: r1(tModel), bench_wall_s: r1(benchWallS)},
    results
};
fs.writeFileSync(args.json, JSON.stringify(info, null, 2) + "\n");

// ---------- markdown table (printed last) ----------
const s = results.single;
const lines = [];
lines.push(`### llama.cpp via node-llama-cpp ${info.versions["node-llama-cpp"]} (prebuilt CPU, llama.cpp ${llamaCppRelease.repo}@${llamaCppRelease.release}), ${path.basename(modelPath)}, threads=${args.threads}`);
lines.push("");
lines.push("| scenario | seqs | prompt tok | gen tok/seq | prompt t/s | TTFT ms (min / med / max) | decode t/s per seq | aggregate out t/s | wall s | CPU util |");
lines.push("|---|---:|---:|---:|---:|---|---:|---:|---:|---:|");
lines.push(`| single stream (median of ${s.reps}) | 1 | ${s.prompt_tokens} | ${s.gen_tokens} | ${s.median.pp_tps} | ${s.median.ttft_ms} | ${s.median.decode_tps} | ${s.median.e2e_tps} | ${r2(s.median.total_ms / 1000)} | ${s.median.cpu_util} |`);
for (const p of results.parallel) {
    if (p.error) { lines.push(`| parallel | ${p.sequences} | - | - | - | error: ${p.error} | - | - | - | - |`); continue; }
    lines.push(`| parallel, one context${p.truncated ? ` (TRUNCATED: ${p.out_tokens} tok, ${p.seqs_started}/${p.sequences} started)` : ""} | ${p.sequences} | ${p.prompt_tokens.min}-${p.prompt_tokens.max} (Σ${p.prompt_tokens.total}) | ${p.gen_tokens_per_seq} | - | ${p.ttft_ms_min} / ${p.ttft_ms_median} / ${p.ttft_ms_max} | ${p.per_seq_decode_tps_median} | ${p.agg_out_tps} | ${r2(p.wall_ms / 1000)} | ${p.cpu_util} |`);
}
lines.push("");
lines.push("prompt t/s = prefill only (evaluateWithoutGeneratingNewTokens); decode t/s = (gen-1)/(t_last-t_first); single-stream aggregate = gen/(TTFT+decode); " +
    "parallel TTFT measured from the moment all sequences are submitted together; CPU util = process CPU-seconds / wall-seconds (max = threads, plus a little JS).");
lines.push(`machine: ${cpuModel}, ${info.machine.nproc} cpus, ${info.machine.total_mem_gib} GiB, node ${process.version}; loadavg start/end ${r2(loadavgAtStart[0])}/${r2(os.loadavg()[0])}; bench wall ${r1(benchWallS)} s; results -> ${args.json}`);
console.log(lines.join("\n"));
