"""The frozen reference policy of DPO, KTO, PPO and GRPO, and the precomputation of its log-probs.

The reference is a separate frozen copy (of the initial policy, or `ref_model` when given), or,
with PEFT, the policy's own base weights with the adapters switched off. With
`precompute_ref_logps` its sequence log-probs are computed once before training, stored in the
examples, and the reference model is dropped (not kept in memory during training).
"""
from __future__ import annotations

import torch

from alignfast.trainers.modeling import Head, HiddenStatesModel, frozen_copy, load_causal_lm
from alignfast.trainers.sequence import sequence_logps, token_logps


class ReferencePolicy:
    def __init__(self, cfg, policy: HiddenStatesModel, device):
        self.cfg, self.device = cfg, device
        self.policy = policy  # used with adapters disabled when PEFT and no ref_model
        if cfg.ref_model:
            self.model = HiddenStatesModel(load_causal_lm(cfg, cfg.ref_model))
            self.model.eval().requires_grad_(False)
        elif cfg.use_peft:
            self.model = None
        else:
            self.model = frozen_copy(policy)
        if self.model is not None:
            self.model.to(device)

    @torch.no_grad()
    def logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """Reference sequence log-probs [B] fp32."""
        if self.model is None:
            with self.policy.causal_lm.disable_adapter():
                return sequence_logps(self.policy, input_ids, attention_mask, labels,
                                      backend=self.cfg.backend, chunk_size=self.cfg.chunk_size)[0]
        return sequence_logps(self.model, input_ids, attention_mask, labels, backend=self.cfg.backend,
                              chunk_size=self.cfg.chunk_size)[0]

    @torch.no_grad()
    def token_logps(self, input_ids, attention_mask, labels, temperature: float = 1.0) -> torch.Tensor:
        """Reference per-token log-probs [B, T-1] fp32 of the shifted labels (0 where ignored)."""
        kw = dict(temperature=temperature, backend=self.cfg.backend, chunk_size=self.cfg.chunk_size)
        if self.model is None:
            with self.policy.causal_lm.disable_adapter():
                return token_logps(self.policy, input_ids, attention_mask, labels, **kw)[0]
        return token_logps(self.model, input_ids, attention_mask, labels, **kw)[0]

    @torch.no_grad()
    def hidden_states(self, input_ids, attention_mask) -> tuple[torch.Tensor, Head]:
        """The reference's last hidden states [B, T, H] and its output head: what the full-vocab KL
        (`linear_kl`) and the reference log-probs of one forward need."""
        if self.model is None:
            with self.policy.causal_lm.disable_adapter():
                return self.policy(input_ids, attention_mask), self.policy.head()
        return self.model(input_ids, attention_mask), self.model.head()

    @torch.no_grad()
    def precompute(self, examples: list[dict], collator, fields: dict[str, tuple[str, ...]], batch_size: int):
        """Stores reference log-probs in each example. `fields` maps an example key to the batch keys
        (input_ids, attention_mask, labels) giving them, rows in example order (e.g. the chosen rows
        are the first half of a preference batch)."""
        was_training = self.policy.training
        self.policy.eval()
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in collator(chunk).items()}
            for key, (ids, mask, labels, part, parts) in fields.items():
                values = self.logps(batch[ids], batch[mask], batch[labels]).chunk(parts)[part]
                for e, v in zip(chunk, values.tolist()):
                    e[key] = v
        self.policy.train(was_training)

    def release(self) -> None:
        self.model = None
