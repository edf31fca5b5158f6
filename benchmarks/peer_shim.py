"""Runs one peer script of `../shared/peers/` in a chosen precision class, inside the peers' venv (torch, TRL).

    $PEERS_VENV/trl/bin/python benchmarks/peer_shim.py {fp32|bf16} PEERS_DIR SCRIPT [ARGS...]

fp32: TRL trainers with `bf16=False` (TRL's own default is bf16 autocast on every device), transformers
generate on the fp32 model. bf16: TRL trainers with `bf16=True` (torch autocast to bf16 over fp32 parameters, as
ours computes in bf16 over fp32 parameters), transformers generate on the model cast to bf16 (its usual bf16
inference; ours generates with bf16 weights and cache too). The peer's result line is printed, not appended to
the shared results file, with the precision class and the shim's `bf16` setting added. Imports no project code
(the peers' venv has no JAX).
"""
import json
import runpy
import sys


def main() -> None:
    precision, peers, script, *args = sys.argv[1:]
    if precision not in ("fp32", "bf16"):
        raise SystemExit(f"precision must be fp32 or bf16, got {precision!r}")
    sys.path.insert(0, peers)
    import common  # the peers' shared set-up (model, tokenizer, data, emit)
    import torch
    from trl.trainer import base_config

    use_bf16 = precision == "bf16"
    original = base_config._BaseConfig.__post_init__

    def post_init(self):  # every TRL config (SFT, DPO, reward, GRPO) runs this before transformers' checks
        self.bf16 = use_bf16
        original(self)

    base_config._BaseConfig.__post_init__ = post_init
    if script.startswith("bench_generate"):
        build = common.model
        common.model = lambda *a, **k: build(*a, **k).to(torch.bfloat16 if use_bf16 else torch.float32)

    def emit(name, **result):
        line = {"bench": name, **result, **common.versions(), "peak_rss_mb": round(common.peak_rss_mb()),
                "precision": precision, "peer_bf16_autocast": use_bf16 and not script.startswith("bench_generate")}
        print(json.dumps(line), flush=True)

    common.emit = emit
    sys.argv = [script, *args]
    runpy.run_path(f"{peers}/{script}", run_name="__main__")


if __name__ == "__main__":
    main()
