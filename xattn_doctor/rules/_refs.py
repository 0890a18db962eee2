"""Reference strings shared by several rules (the seed playbook and the papers it cites)."""

from __future__ import annotations

SEED = "xattn-doctor seed playbook, cross-attention-training-stability.md"
WORTSMAN = ("Wortsman et al. 2023, Small-scale proxies for large-scale Transformer training "
            "instabilities, arXiv:2309.14322 (attention logit growth; qk-layernorm)")
DEHGHANI = ("Dehghani et al. 2023, Scaling Vision Transformers to 22 Billion Parameters, "
            "arXiv:2302.05442 (QK-norm)")
GEMMA2 = "Gemma Team 2024, Gemma 2, arXiv:2408.00118 (attention logit soft-cap at 50)"
KIMI = "Kimi Team 2025, Kimi K2, arXiv:2507.20534 (QK-Clip: per-head max logit capped at 100)"
ZHAI = ("Zhai et al. 2023, Stabilizing Transformer Training by Preventing Attention Entropy "
        "Collapse, arXiv:2303.06296")
XIONG = ("Xiong et al. 2020, On Layer Normalization in the Transformer Architecture, "
         "arXiv:2002.04745 (pre-LN vs post-LN)")
FLAMINGO = ("Alayrac et al. 2022, Flamingo: a Visual Language Model for Few-Shot Learning, "
            "arXiv:2204.14198 (tanh gates initialised at 0, grad clip 1.0, warmup)")
SINKS = ("Gu et al. 2025, When Attention Sink Emerges in Language Models, arXiv:2410.10781 "
         "(sinks are normal)")
MIXED = ("Micikevicius et al. 2018, Mixed Precision Training, arXiv:1710.03740 (fp16 range, "
         "loss scaling)")
