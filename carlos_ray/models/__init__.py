"""Model factories: `create_generator(spec)` and `create_encoder(spec)` look the kind up in a registry."""

from __future__ import annotations

from carlos_ray.config import EncoderSpec, GeneratorSpec


def list_generators() -> list[str]:
    from carlos_ray.models.generator import generator_registry

    return sorted(generator_registry())


def list_encoders() -> list[str]:
    from carlos_ray.models.encoder import encoder_registry

    return sorted(encoder_registry())


def create_generator(spec: GeneratorSpec, output_size: int):
    """Build the generator named by `spec.kind`; images come back at `output_size` (the encoder's input)."""
    from carlos_ray.models.generator import generator_registry

    reg = generator_registry()
    if spec.kind not in reg:
        raise ValueError(f"unknown generator kind {spec.kind!r}; valid: {', '.join(sorted(reg))}")
    return reg[spec.kind](spec, output_size)


def create_encoder(spec: EncoderSpec):
    """Build the encoder named by `spec.kind`."""
    from carlos_ray.models.encoder import encoder_registry

    reg = encoder_registry()
    if spec.kind not in reg:
        raise ValueError(f"unknown encoder kind {spec.kind!r}; valid: {', '.join(sorted(reg))}")
    return reg[spec.kind](spec)


def encoder_image_size(spec: EncoderSpec) -> int:
    """Input size of an encoder without building it (an embedded model's config, or open_clip's model config)."""
    from carlos_ray.models.registry import embedded_encoder

    embedded = embedded_encoder(spec.arch)
    if embedded is not None:
        return embedded.image_size()
    import open_clip

    cfg = open_clip.get_model_config(spec.arch)
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {spec.arch!r}")
    size = cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)
