"""Why no cross-attention block was found: the one-line message for `NoBlocksError`.

Most vision-language models (LLaVA, Qwen2-VL, PaliGemma, ...) have no cross-attention at all:
a projector maps image features into the text embedding space and the projected image tokens
are concatenated into the text sequence, which the language model reads with ordinary
self-attention. For those the message names the family and says so plainly, rather than
suggesting that the tool missed something. Idefics2 is not one of them: its image tokens join
the text sequence too, but its Perceiver resampler is cross-attention (layout
`idefics2_perceiver`), so an Idefics2 checkpoint where none is found gets the generic message.
"""

from __future__ import annotations

from collections.abc import Iterable

from xattn_doctor.layouts._base import KeyIndex, ModelConfig

CONCAT_FAMILIES = {
    "llava": "LLaVA", "llava_llama": "LLaVA", "llava_mistral": "LLaVA",
    "llava_next": "LLaVA-NeXT", "llava_next_video": "LLaVA-NeXT-Video",
    "llava_onevision": "LLaVA-OneVision", "video_llava": "Video-LLaVA", "vipllava": "VipLlava",
    "qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_moe": "Qwen3-VL", "qwen2_5_omni": "Qwen2.5-Omni",
    "paligemma": "PaliGemma", "gemma3": "Gemma 3", "gemma3n": "Gemma 3n",
    "idefics3": "Idefics3", "smolvlm": "SmolVLM",
    "internvl": "InternVL", "internvl_chat": "InternVL", "aya_vision": "Aya Vision",
    "mistral3": "Mistral 3", "pixtral": "Pixtral", "fuyu": "Fuyu", "got_ocr2": "GOT-OCR2",
    "phi3_v": "Phi-3-Vision", "phi4_multimodal": "Phi-4-multimodal", "minicpmv": "MiniCPM-V",
    "molmo": "Molmo", "chameleon": "Chameleon", "emu3": "Emu3", "janus": "Janus",
    "deepseek_vl": "DeepSeek-VL", "deepseek_vl_hybrid": "DeepSeek-VL", "glm4v": "GLM-4V",
    "kimi_vl": "Kimi-VL", "llama4": "Llama 4", "ovis": "Ovis", "cohere2_vision": "Command A Vision",
}
# Architecture class-name prefixes, for configs whose model_type is missing or custom.
ARCH_PREFIXES = {
    "Llava": "LLaVA", "VipLlava": "VipLlava", "VideoLlava": "Video-LLaVA",
    "Qwen2VL": "Qwen2-VL", "Qwen2_5_VL": "Qwen2.5-VL", "Qwen3VL": "Qwen3-VL",
    "PaliGemma": "PaliGemma", "Gemma3ForConditional": "Gemma 3",
    "Idefics3": "Idefics3", "SmolVLM": "SmolVLM", "InternVL": "InternVL",
    "AyaVision": "Aya Vision", "Mistral3": "Mistral 3", "Fuyu": "Fuyu", "Phi3V": "Phi-3-Vision",
    "MiniCPMV": "MiniCPM-V", "Molmo": "Molmo", "Chameleon": "Chameleon", "Janus": "Janus",
    "Glm4v": "GLM-4V", "Llama4ForConditional": "Llama 4",
}
# diffusers transformers (config `_class_name`) with joint attention instead of cross-attention.
JOINT_CLASSES = {
    "SD3Transformer2DModel": "Stable Diffusion 3", "FluxTransformer2DModel": "Flux",
    "ChromaTransformer2DModel": "Chroma", "HunyuanVideoTransformer3DModel": "HunyuanVideo",
}
CONCAT = ("a vision-language model that projects image features into the text sequence and "
          "reads them with ordinary self-attention")
JOINT = ("a diffusion transformer whose joint (MMDiT) attention reads text and image tokens "
         "as one sequence")
# Families that do have cross-attention: never explained away as concatenation models.
CROSS_TYPES = {"mllama", "idefics", "idefics2", "idefics2_perceiver", "flamingo", "openflamingo",
               "blip-2", "blip_2", "instructblip", "instructblipvideo", "kosmos-2", "whisper",
               "t5", "bart", "encoder-decoder", "vision-encoder-decoder", "pix2struct",
               "florence2"}
CROSS_ARCHS = ("Mllama", "IdeficsFor", "IdeficsModel", "Idefics2", "Blip2", "InstructBlip",
               "Kosmos2", "Flamingo")
# Key fragments of a projector that feeds image tokens into the text sequence.
PROJECTOR_KEYS = {
    "multi_modal_projector.": "a LLaVA-style", "mm_projector.": "a LLaVA-style",
    "visual.merger.": "a Qwen-VL-style", "connector.modality_projection.": "an Idefics3-style",
}
CROSS_HINTS = ("cross", "attn2", "encoder_attn", "xattn", "gated_x", "perceiver_resampler")
POINT_AT = ("To diagnose a cross-attention block the tool missed, keep it under a recognised "
            "name (a module called cross_attn, attn2, encoder_attn or crossattention holding "
            "q_proj/k_proj/v_proj, to_q/to_k/to_v, query/key/value or a packed "
            "in_proj_weight), select it with `blocks.include` in the --config file and give "
            "--heads N if config.json does not say; see README 'A model the tool does not "
            "recognise'.")


def explain_no_blocks(index: KeyIndex, config: ModelConfig, tried: Iterable[str]) -> str:
    """The one-line reason no cross-attention block was found, naming the model family."""
    layouts = ", ".join(tried) or "none"
    joint = JOINT_CLASSES.get(str(config.data.get("_class_name")))
    family = f"a {joint} ({config.data['_class_name']})" if joint else \
        _concat_family(index, config)
    if family is not None:
        return (f"no cross-attention: this is {family} checkpoint, {JOINT if joint else CONCAT}, "
                "so there is no cross-attention block to diagnose (layouts tried: "
                f"{layouts}). {POINT_AT}")
    return (f"no cross-attention block recognised (layouts tried: {layouts}); self-attention "
            f"blocks are never diagnosed. {POINT_AT}")


def _concat_family(index: KeyIndex, config: ModelConfig) -> str | None:
    """'a LLaVA (model_type 'llava')'-style description, or None when not a known one."""
    model_type = str(config.data.get("model_type") or "").lower()
    archs = [a for a in config.data.get("architectures") or [] if isinstance(a, str)]
    if model_type in CROSS_TYPES or any(a.startswith(CROSS_ARCHS) for a in archs):
        return None
    if model_type in CONCAT_FAMILIES:
        return f"a {CONCAT_FAMILIES[model_type]} (model_type '{model_type}')"
    for arch in archs:
        for prefix, family in ARCH_PREFIXES.items():
            if arch.startswith(prefix):
                return f"a {family} ({arch})"
    if any(hint in key.lower() for key in index.shapes for hint in CROSS_HINTS):
        return None
    for fragment, style in PROJECTOR_KEYS.items():
        if any(key.startswith(fragment) or f".{fragment}" in key for key in index.shapes):
            return f"{style} (its keys hold `{fragment.rstrip('.')}`)"
    return None
