"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the right status."""
from __future__ import annotations

import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from gateway.openai_schema import ParamError

RETRY_AFTER_OVERLOADED_S = 1
RETRY_AFTER_UNAVAILABLE_S = 5


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def overloaded(message: str) -> APIError:
    return APIError(429, message, "rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_OVERLOADED_S)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, "server_error", code="service_unavailable",
                    headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})


# ---- pydantic validation errors -> 400 ------------------------------------------------------

_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param_path(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc[1:]
             if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS or p.startswith("function-")))]
    return ".".join(parts) or None


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, default=str)
    except ValueError:  # NaN / Infinity from a lenient JSON parser
        text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request").response()
    # A union (e.g. prompt: str | list[int] | ...) reports one error per member; the deepest
    # one is usually the member the client meant (["a", 5] -> prompt.1 should be a string).
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    if any(e.get("type") == "json_invalid" for e in errors):
        err = next(e for e in errors if e.get("type") == "json_invalid")
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "),
                        code="invalid_json").response()
    loc = tuple(err.get("loc", ()))
    param = _param_path(loc)
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):  # a cross-field check names its own field
        param = ".".join(p for p in (param, cause.param) if p)
        return APIError(400, f"{param}: {cause}", param=param).response()
    if err.get("type") == "missing":
        text = f"{param}: field required"
    elif param is None:
        text = (f"request body must be a JSON object (Content-Type: application/json): {msg} "
                f"(got {_show(err.get('input'))})")
    else:
        text = f"{param}: {msg} (got {_show(err.get('input'))})"
    return APIError(400, text, param=param).response()
