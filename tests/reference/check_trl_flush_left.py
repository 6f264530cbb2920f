"""Shows TRL 0.12.2's DPO flush-left truncation dropping the last real column at batch > 1.

`DPOTrainer.concatenated_forward` left-aligns each row, then keeps `input_ids[:, : first_empty_col - 1]`:
one column fewer than the non-empty ones whenever an all-padding column exists. This calls TRL's own
method with a stand-in model that records what it is given. Batch 1 (the fixtures) never has an
all-padding column, so tests/fixtures/dpo is unaffected; qtune's batched DPO should keep every token.

Run: python tests/reference/check_trl_flush_left.py  (prints the rows the model saw; exits 1 if TRL
no longer drops a token, i.e. the note in NOTES-dpo-peft.md is out of date)
"""
import sys
import types

import torch
from trl import DPOTrainer


class Recorder(torch.nn.Module):
    def forward(self, input_ids, attention_mask):
        self.seen = input_ids.clone()
        return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, 10))


def main():
    trainer = types.SimpleNamespace(
        concatenated_inputs=DPOTrainer.concatenated_inputs, padding_value=0, aux_loss_enabled=False,
        is_encoder_decoder=False, use_weighting=False, loss_type="sigmoid",
        args=types.SimpleNamespace(max_length=None, rpo_alpha=None))
    # Row 0: 4-token prompt, 1-token completions; row 1: 1-token prompt (left-padded), 4-token completions.
    batch = dict(
        prompt_input_ids=torch.tensor([[5, 5, 5, 5], [0, 0, 0, 6]]),
        prompt_attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]]),
        chosen_input_ids=torch.tensor([[7, 0, 0, 0], [8, 8, 8, 8]]),
        chosen_attention_mask=torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]]),
        rejected_input_ids=torch.tensor([[7, 0, 0, 0], [9, 9, 9, 9]]),
        rejected_attention_mask=torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]]))
    m = Recorder()
    DPOTrainer.concatenated_forward(trainer, m, batch)
    print("the model saw:\n", m.seen)
    # Every row holds 5 real tokens (prompt + completion); TRL passes 4.
    dropped = m.seen.shape[1] == 4
    print("last real token dropped:", dropped)
    return 0 if dropped else 1


if __name__ == "__main__":
    sys.exit(main())
