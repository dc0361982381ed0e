"""The image provider's contract, per model: what `POST /v1/images/generations` takes.

One source for three places that must agree: submit-time validation (the database's
`genworker.image_models` rows are written from `MODELS` on every migrate), the request a
worker sends (only the fields its model takes), and the simulated provider, which
refuses what the real one refuses, with the real error shape, so a client that drifts
from the contract fails a test instead of 70 jobs in production.

From OpenAI's documentation of the endpoint (the official SDK's `ImageGenerateParams`).
A model not listed here (aggregators serve many) gets only the common fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

COMMON_FIELDS = ("model", "prompt", "n", "size")  # what every model takes
# Options a task may carry in its params, sent when its model takes them.
TASK_OPTIONS = (
    "quality",
    "style",
    "background",
    "output_format",
    "output_compression",
    "moderation",
)


@dataclass(frozen=True)
class ModelContract:
    name: str
    max_prompt_chars: int
    sizes: tuple[str, ...]
    n_max: int
    # option -> the values it takes (a range for integers); an option not listed is refused
    options: Mapping[str, tuple[str, ...] | range] = field(default_factory=dict)
    # empty: the model refuses `response_format` and always answers b64_json
    response_formats: tuple[str, ...] = ()
    usage: bool = False  # the answer carries token usage

    def takes(self, name: str) -> bool:
        return (
            name in COMMON_FIELDS
            or name in self.options
            or (name == "response_format" and bool(self.response_formats))
        )

    def as_row(self) -> dict[str, Any]:
        """What `genworker.image_models` holds for this model (submit-time checks)."""
        options: dict[str, Any] = {}
        for name, values in self.options.items():
            if isinstance(values, range):
                options[name] = {"min": values.start, "max": values.stop - 1}
            else:
                options[name] = list(values)
        return {
            "name": self.name,
            "max_prompt_chars": self.max_prompt_chars,
            "sizes": list(self.sizes),
            "n_max": self.n_max,
            "options": options,
            "response_formats": list(self.response_formats),
        }


MODELS: dict[str, ModelContract] = {
    m.name: m
    for m in (
        ModelContract(
            "gpt-image-1",
            max_prompt_chars=32_000,
            sizes=("1024x1024", "1536x1024", "1024x1536", "auto"),
            n_max=10,
            options={
                "quality": ("low", "medium", "high", "auto"),
                "background": ("transparent", "opaque", "auto"),
                "output_format": ("png", "jpeg", "webp"),
                "output_compression": range(0, 101),
                "moderation": ("low", "auto"),
            },
            usage=True,
        ),
        ModelContract(
            "dall-e-3",
            max_prompt_chars=4_000,
            sizes=("1024x1024", "1792x1024", "1024x1792"),
            n_max=1,
            options={"quality": ("standard", "hd"), "style": ("vivid", "natural")},
            response_formats=("url", "b64_json"),
        ),
        ModelContract(
            "dall-e-2",
            max_prompt_chars=1_000,
            sizes=("256x256", "512x512", "1024x1024"),
            n_max=10,
            options={"quality": ("standard",)},
            response_formats=("url", "b64_json"),
        ),
    )
}


@dataclass(frozen=True)
class Refusal:
    """What the provider answers a request it refuses: HTTP 400 with this error object."""

    message: str
    param: str | None
    code: str

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": "invalid_request_error",
                "param": self.param,
                "code": self.code,
            }
        }


def _quoted(values: tuple[str, ...]) -> str:
    names = [f"'{v}'" for v in values]
    return ", ".join(names[:-1]) + f", and {names[-1]}" if len(names) > 1 else names[0]


def refusal(body: Mapping[str, Any]) -> Refusal | None:
    """Why the provider refuses this request body, or None if a known model takes it.
    A model not in MODELS is checked for the common fields only."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return Refusal(
            "Missing required parameter: 'prompt'.", "prompt", "missing_required_parameter"
        )
    model = MODELS.get(str(body.get("model")))
    if model is None:
        extra = sorted(k for k in body if k not in COMMON_FIELDS)
        if extra:
            return Refusal(f"Unknown parameter: '{extra[0]}'.", extra[0], "unknown_parameter")
        return None
    for name in body:
        if not model.takes(name):
            return Refusal(f"Unknown parameter: '{name}'.", name, "unknown_parameter")
    if len(prompt) > model.max_prompt_chars:
        return Refusal(
            f"Invalid 'prompt': string too long. Expected a string with maximum length "
            f"{model.max_prompt_chars}, but got a string with length {len(prompt)} instead.",
            "prompt",
            "string_above_max_length",
        )
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= model.n_max:
        if model.n_max == 1:
            return Refusal("You must provide n=1 for this model.", "n", "invalid_value")
        return Refusal(
            f"Invalid 'n': expected an integer from 1 to {model.n_max}.", "n", "invalid_value"
        )
    checks: list[tuple[str, tuple[str, ...] | range]] = [("size", model.sizes)]
    checks += list(model.options.items())
    if model.response_formats:
        checks.append(("response_format", model.response_formats))
    for name, allowed in checks:
        if name in body and not _allowed(body[name], allowed):
            return Refusal(_invalid_value(name, body[name], allowed), name, "invalid_value")
    return None


def _allowed(value: Any, allowed: tuple[str, ...] | range) -> bool:
    if isinstance(allowed, range):
        return isinstance(value, int) and not isinstance(value, bool) and value in allowed
    return isinstance(value, str) and value in allowed


def _invalid_value(name: str, value: Any, allowed: tuple[str, ...] | range) -> str:
    shown = repr(value)[:40]
    if isinstance(allowed, range):
        return (
            f"Invalid '{name}': {shown}. Expected an integer from {allowed.start} "
            f"to {allowed.stop - 1}."
        )
    return f"Invalid value: {shown}. Supported values are: {_quoted(allowed)}."


def request_body(
    model_name: str,
    prompt: str,
    params: Mapping[str, Any],
    *,
    default_size: str,
    response_format: str,
) -> dict[str, Any]:
    """The body of one generation for a job: only the fields its model takes.

    `params` are the task's (validated at submit for a known model); `response_format`
    is the node's setting, sent only to models that take it. An unknown model gets the
    common fields alone.
    """
    size = params.get("size") or default_size
    body: dict[str, Any] = {"model": model_name, "prompt": prompt, "n": 1, "size": size}
    model = MODELS.get(model_name)
    if model is None:
        return body
    if size not in model.sizes:
        # a node-wide default the model does not take (e.g. 1024x1024 is common to all
        # three, but a site may set 1792x1024): leave it to the model's own default
        del body["size"]
    for name in model.options:
        if name in params:
            body[name] = params[name]
    if model.response_formats:
        body["response_format"] = response_format
    return body


def option_problem(model_name: str, params: Mapping[str, Any]) -> str | None:
    """Why a task's model options cannot go to `model_name`, in one line, or None.
    (The same rule the database applies at submit, for callers that check first.)"""
    model = MODELS.get(model_name)
    for name in TASK_OPTIONS:
        if name not in params:
            continue
        if model is None:
            return f"invalid option {name}: model {model_name!r} is not one genworker knows"
        allowed = model.options.get(name)
        if allowed is None:
            return f"invalid option {name}: model {model_name} does not take it"
        if not _allowed(params[name], allowed):
            return f"invalid option {name}: {_invalid_value(name, params[name], allowed)}"
    if "size" in params and model is not None and params["size"] not in model.sizes:
        sizes = ", ".join(model.sizes)
        return f"invalid size {str(params['size'])[:40]!r}: {model_name} takes {sizes}"
    return None
