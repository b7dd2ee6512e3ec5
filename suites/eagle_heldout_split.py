"""Held-out top-1 of EAGLE heads, split by whether the target's argmax lies in a reduced draft vocabulary.

    python suites/eagle_heldout_split.py --heads eagle-smollm2-135m DIR ... --vocab-of eagle-smollm2-135m \
        --out results/studies/eagle_heldout_split.json

Each head is scored as training scores it (`head_heldout_accuracy`: teacher-forced on the target's
features, assistant tokens of the last `--heldout` usable ShareGPT conversations, never trained on), and
the positions are split by whether the target's argmax is among the draft ids of `--vocab-of` (a head
trained over a reduced vocabulary, whose d2t mapping it reads). A reduced-vocabulary head scores 0 outside
its ids by construction: the split separates that ceiling from how well it predicts inside them.
"""

from __future__ import annotations

import argparse
import json

import torch


@torch.no_grad()
def split_top1(heads: dict, model, tokenizer, conversations, inside_ids: torch.Tensor, max_tokens: int) -> dict:
    from specbench.training.features import target_hidden_states
    from specbench.training.sharegpt import format_conversation
    from specbench.training.tasks import frozen_lm_head_fn

    target_logits = frozen_lm_head_fn(model.get_output_embeddings())
    member = torch.zeros(model.get_output_embeddings().weight.shape[0], dtype=torch.bool)
    member[inside_ids] = True
    hits = {name: [0, 0] for name in heads}  # inside, outside
    n = [0, 0]
    for _, conv in conversations:
        f = format_conversation(tokenizer, conv, max_tokens)
        if sum(f.loss_mask[1:]) == 0:
            continue
        ids = torch.tensor([f.input_ids])
        h = target_hidden_states(model, ids).float()
        T = ids.shape[1] - 1
        m = torch.tensor(f.loss_mask[1:], dtype=torch.bool)
        argmax = target_logits(h[0, 1:][m]).argmax(-1)
        inside = member[argmax]
        n[0] += int(inside.sum())
        n[1] += int((~inside).sum())
        for name, head in heads.items():
            out = head(ids[:, 1:], h[:, :T], torch.arange(T)[None])
            pred = head.logits(head.token_features(out)[0][m]).argmax(-1)
            if getattr(head, "draft_ids", None) is not None:
                pred = head.draft_ids[pred]
            hit = pred == argmax
            hits[name][0] += int(hit[inside].sum())
            hits[name][1] += int(hit[~inside].sum())
    return {"positions": {"inside": n[0], "outside": n[1], "inside_share": n[0] / max(sum(n), 1)},
            "top1": {name: {"all": (a + b) / max(sum(n), 1), "inside": a / max(n[0], 1), "outside": b / max(n[1], 1)}
                     for name, (a, b) in hits.items()}}


def main(argv: list[str] | None = None) -> int:
    import sys

    from specbench.artifacts import environment, utc_now, write_json
    from specbench.methods.head_drafters import checkpoint_dir
    from specbench.models import load_model
    from specbench.models.draft_heads import checkpoint_sha256, load_head
    from specbench.training.features import heldout_conversations

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", nargs="+", required=True, help="EAGLE-architecture checkpoints (paths or names)")
    ap.add_argument("--vocab-of", required=True, help="the head whose draft ids split the positions")
    ap.add_argument("--heldout", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=384)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="also write the result here (JSON)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    target = load_model("smollm2-135m", dtype="float32", device="cpu")
    model = target.model.eval()
    heads = {h: load_head(checkpoint_dir(h), model).head for h in a.heads}
    vocab = load_head(checkpoint_dir(a.vocab_of), model).head
    if getattr(vocab, "draft_ids", None) is None:
        raise SystemExit(f"{a.vocab_of}: not a reduced-vocabulary head (no d2t mapping)")
    got = split_top1(heads, model, target.tokenizer, heldout_conversations("sharegpt", a.heldout), vocab.draft_ids,
                     a.max_tokens)
    result = {"kind": "specbench.study.eagle_heldout_split", "schema_version": 1, "date": utc_now(),
              "command": "python suites/eagle_heldout_split.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "heads": {h: checkpoint_sha256(checkpoint_dir(h)) for h in a.heads},
              "vocab_of": a.vocab_of, "draft_vocab": int(vocab.draft_ids.numel()), "heldout": a.heldout,
              "max_tokens": a.max_tokens, "environment": environment("cpu"), **got}
    print(json.dumps(result, indent=1))
    if a.out:
        write_json(a.out, result, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
