"""metric_ds.encode: one way to run a model over texts, in input order, batched or not, sorted or not."""
from __future__ import annotations

import pytest
import torch

from metric_ds import encode as E
from metric_ds.model import MetricClassifier, mean_pool

TEXTS = ["card", "refund please now", "", "transfer transfer transfer transfer transfer atm cash fee top up",
         "pin lost", "exchange fee account lost card please help me", "atm"]


@pytest.fixture(scope="module")
def classifier(tiny_model_dir):
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(0)
    model = MetricClassifier(AutoModel.from_pretrained(tiny_model_dir), 4, "mean", 8).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def test_encode_keeps_input_order_whatever_the_batching(classifier):
    model, tokenizer = classifier
    alone = [E.encode(model, tokenizer, [t], 12, 1, "cpu") for t in TEXTS]
    for batch_size in (2, 3, 64):
        for length_sorted in (True, False):
            out = E.encode(model, tokenizer, TEXTS, 12, batch_size, "cpu", length_sorted=length_sorted)
            assert set(out) == set(E.OUTPUTS)
            for name in E.OUTPUTS:
                assert out[name].dtype == torch.float32 and out[name].shape[0] == len(TEXTS)
                torch.testing.assert_close(out[name], torch.cat([a[name] for a in alone]), atol=1e-5, rtol=1e-5)


def test_encode_of_no_texts_has_the_output_widths(classifier):
    model, tokenizer = classifier
    out = E.encode(model, tokenizer, [], 12, 4)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"logits": (0, 4), "h": (0, 32), "z": (0, 8)}
    assert E.encode(lambda **_: None, tokenizer, [], 12, 4) == {}  # a bare embedder: nothing to size


def test_a_bare_embedder_gives_z(classifier):
    model, tokenizer = classifier

    def embedder(input_ids, attention_mask, **extra):
        states = model.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return mean_pool(states, attention_mask)

    out = E.encode(embedder, tokenizer, TEXTS, 12, 3, "cpu")
    assert list(out) == ["z"]
    torch.testing.assert_close(out["z"], E.encode(model, tokenizer, TEXTS, 12, 3, "cpu")["h"])


def test_an_outer_progress_bar_is_advanced(classifier):
    model, tokenizer = classifier

    class Bar:
        n = 0

        def update(self, k: int) -> None:
            self.n += k

    bar = Bar()
    E.encode(model, tokenizer, TEXTS, 12, 3, "cpu", bar=bar)
    assert bar.n == len(TEXTS)


def test_row_batches_and_device():
    assert E.row_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert E.row_batches(4, 2, [1, 5, 3, 5]) == [[1, 3], [2, 0]]  # longest first, ties in order
    assert E.pick_device("cpu") == torch.device("cpu")
    assert E.pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_mean_pool_ignores_padding():
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    torch.testing.assert_close(mean_pool(states, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)"))])
def test_outputs_gathered_on_the_device_asked_for(classifier, device):
    """``out_device``: the outputs stay where the caller goes on computing (evaluate's metrics on the model's
    device), in input order and equal to the CPU gathering; no texts gives empty outputs there too."""
    model, tokenizer = classifier
    model = model.to(device)
    try:
        on_cpu = E.encode(model, tokenizer, TEXTS, 12, 3, device)
        there = E.encode(model, tokenizer, TEXTS, 12, 3, device, out_device=device)
        assert {v.device.type for v in on_cpu.values()} == {"cpu"}
        assert {v.device.type for v in there.values()} == {device}
        for name, value in on_cpu.items():
            torch.testing.assert_close(there[name].cpu(), value)
        assert {v.device.type for v in E.encode(model, tokenizer, [], 12, 3, device, out_device=device).values()} \
            == {device}
    finally:
        model.to("cpu")
