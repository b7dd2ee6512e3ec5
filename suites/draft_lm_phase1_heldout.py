"""The untrained phase-1 drafter's held-out top-1, measured as training measures the distilled drafters'.

    python suites/draft_lm_phase1_heldout.py --threads 2

The target's first `--layers` layers under its norm and LM head (`prefix:K`, `sps`'s default), scored by
`DraftLMTask.heldout` over the committed distilled drafts' first `--draft-vocab` ids (their
draft_vocab.json) on the same `--heldout` held-out ShareGPT conversations, at their `--max-tokens`: the
phase-1 row beside the KLD/TVD/TVD++ manifests' "heldout" figures. Prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from specbench.methods.head_drafters import CHECKPOINTS_DIR
    from specbench.models import load_model
    from specbench.models.draft_heads import DRAFT_VOCAB_FILE
    from specbench.models.draft_lm import layer_prefix_draft
    from specbench.training.draft_lm import DraftLM, DraftLMOptions, DraftLMTask
    from specbench.training.features import heldout_conversations

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--draft-vocab", type=int, default=4096)
    ap.add_argument("--ranking", default=str(CHECKPOINTS_DIR / "tvdpp-smollm2-135m" / DRAFT_VOCAB_FILE))
    ap.add_argument("--heldout", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    target = load_model("smollm2-135m")
    task = DraftLMTask(DraftLMOptions(layers=a.layers, draft_vocab=a.draft_vocab))
    task.support = torch.tensor(json.loads(Path(a.ranking).read_text())[: a.draft_vocab])
    draft = DraftLM(layer_prefix_draft(target.model, a.layers).float())
    got = task.heldout(draft, target.model, target.tokenizer, heldout_conversations("sharegpt", a.heldout),
                       a.max_tokens)
    print(json.dumps({"drafter": f"prefix:{a.layers}", "draft_vocab": a.draft_vocab, "ranking": a.ranking, **got}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
