import json

import pytest
import torch

from hf_dmsae import DMSAEModel
from hf_dmsae.synthetic import SyntheticArguments, SyntheticBenchmark, consistency


def test_consistency_is_one_for_the_same_directions_in_any_order_and_sign():
    decoder = torch.randn(20, 8)
    assert consistency(decoder, -decoder[torch.randperm(20)] * 3) == pytest.approx(1.0)
    assert consistency(torch.eye(4), torch.eye(4)[:, [1, 0, 3, 2]] + torch.eye(4)) < 1.0


def test_benchmark_distils_transfers_scores_and_resumes(tmp_path):
    args = SyntheticArguments(num_features=128, hidden_dim=24, root_features=8, dict_size=128, distill_k=8,
                              transfer_ks=[8], cycles=2, train_tokens=6144, attribution_tokens=2048, eval_tokens=2048,
                              batch_size=512, output_dir=str(tmp_path / "run"))  # fmt: skip
    results = SyntheticBenchmark(args).run()

    for seed in (0, 1):
        record = results[f"seed{seed}"]
        first, last = record["cycles"]
        assert last["carried_over"] <= min(first["core_size"], last["core_size"])
        assert 0 < record["distilled_core_size"] <= last["core_size"]
        for name in ("k8-dense_core", "k8-sparse_core", "k8-matryoshka"):
            scores = record["models"][name]
            assert 0 < scores["mcc"] <= 1 and scores["explained_variance"] <= 1 and scores["l0"] > 0
        dmsae = DMSAEModel.from_pretrained(tmp_path / "run" / f"seed{seed}" / "k8-dense_core")
        cycle1 = DMSAEModel.from_pretrained(tmp_path / "run" / f"seed{seed}" / "cycle1")
        assert dmsae.config.core_size == record["distilled_core_size"]
        # The distilled core's rows are cycle 1's encoder rows of those latents, bit for bit.
        ids = cycle1.config.latent_ids()
        rows = cycle1.W_enc[[ids.index(i) for i in dmsae.config.core_ids]]
        assert torch.equal(dmsae.W_enc_frozen, rows)
    assert set(results["consistency"]) == {"k8-dense_core", "k8-sparse_core", "k8-matryoshka"}

    weights = tmp_path / "run" / "seed0" / "k8-dense_core" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    rerun = SyntheticBenchmark(args)
    assert rerun.run()["seed0"]["models"] == results["seed0"]["models"]
    report = rerun.report()
    assert "| 8 | dense_core |" in report and "| 8 | sparse_core |" in report and "| 8 | matryoshka |" in report
    with pytest.raises(ValueError, match="'dmsae'"):
        SyntheticArguments(variants=["dmsae"])
    assert (tmp_path / "run" / "figures" / "synthetic_vs_k.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["consistency"] == results["consistency"]
    assert weights.stat().st_mtime_ns == before  # nothing retrained
