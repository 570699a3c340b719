"""The shared scoring primitives (repro.core.scoring): padded teacher-forcing batches, log-probs at
positions and the per-row target NLL, checked against hand-computed values."""
from __future__ import annotations

import math

import pytest
import torch

from repro.core.scoring import logprobs_at, pad_rows, row_nll


def test_pad_rows_feeds_all_but_the_last_target_token_and_right_pads():
    b = pad_rows([[5, 6, 7], [8], [9, 4]], [[1, 2], [3], []], pad_id=0, device="cpu", subject_idx=[1, 0, 0])
    assert b.input_ids.tolist() == [[5, 6, 7, 1], [8, 0, 0, 0], [9, 4, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    assert b.loss_pos.tolist() == [[2, 3], [0, 0], [0, 0]]  # token j predicted at len(prompt) - 1 + j
    assert b.labels.tolist() == [[1, 2], [3, 0], [0, 0]]
    assert b.label_mask.tolist() == [[1, 1], [1, 0], [0, 0]]  # the empty target scores nothing
    assert b.subject_idx.tolist() == [1, 0, 0]
    assert b.last_idx.tolist() == [3, 0, 1]
    assert pad_rows([[5, 6, 7], [8]], [[1], [2]], 0, "cpu").subject_idx.tolist() == [2, 0]  # default: last prompt token


def test_row_nll_is_the_mean_over_real_target_tokens():
    p = torch.tensor([
        [[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]],  # row 0: two target tokens, labels 0 and 1
        [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]],  # row 1: one target token (label 2); position 1 is padding
    ])
    labels = torch.tensor([[0, 1], [2, 1]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    got = row_nll(p.log(), labels, mask)
    want = [-(math.log(0.5) + math.log(0.8)) / 2, -math.log(0.6)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    # one distribution per row scoring every target token (FT-L's prompt_last)
    got = row_nll(p[:, :1].log(), labels, mask)
    assert got.tolist() == pytest.approx([-(math.log(0.5) + math.log(0.25)) / 2, -math.log(0.6)], rel=1e-6)
    # a row without target tokens scores 0, not nan
    assert row_nll(p.log(), labels, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))[1].item() == 0.0
    with pytest.raises(ValueError, match="3 target tokens"):
        row_nll(p.log(), torch.zeros((2, 3), dtype=torch.long), torch.ones((2, 3)))


def test_logprobs_at_reads_the_model_at_the_given_positions(tiny_lm):
    tok = tiny_lm.tokenizer
    prompts = [tok("The Eiffel Tower is in")["input_ids"], tok("Paris")["input_ids"]]
    batch = pad_rows(prompts, [tok(" Rome")["input_ids"], tok(" France is")["input_ids"]],
                     tok.pad_token_id, tiny_lm.device)
    with torch.no_grad():
        got = logprobs_at(tiny_lm, batch, batch.loss_pos)
        logits = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rows = torch.arange(2).unsqueeze(1)
        want = torch.log_softmax(logits.float(), -1)[rows, batch.loss_pos]
        assert got.shape == (2, batch.loss_pos.shape[1], logits.shape[-1]) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # from hidden states already computed: the same numbers, bit for bit
        hidden = tiny_lm.spec.base_model(tiny_lm.model)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        assert torch.equal(logprobs_at(tiny_lm, hidden, batch.loss_pos), got)
