"""`core.errors`: the user error behind an exception is found through Ray's wrappers, and it is the error itself."""

from __future__ import annotations

from core.errors import UserError, user_error


def test_the_user_error_is_found_through_ray_and_not_rays_copy_of_it() -> None:
    inner = UserError("/data/a.jsonl.gz: corrupt or truncated JSONL")
    # what Ray raises on the driver for a task that raised `inner`: an instance of both RayTaskError and the error's
    # class, whose message is Ray's traceback, with the original as `.cause`
    wrapper_type = type("RayTaskError(UserError)", (UserError,), {"__module__": "ray.exceptions"})
    wrapper = wrapper_type("ray.data.exceptions.SystemException\n\nray::_fit_tokenizer() ...")
    wrapper.cause = inner  # type: ignore[attr-defined]
    outer = RuntimeError("stage failed")
    outer.__cause__ = wrapper
    assert user_error(outer) is inner
    lone = wrapper_type("only Ray's copy")  # no original behind it: Ray's copy is still a user error
    assert user_error(lone) is lone
    assert user_error(RuntimeError("a bug")) is None
