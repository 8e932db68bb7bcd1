"""HTTP plumbing: how request bodies are read, how responses are written and errors answered."""

import io

from inspect import iscoroutinefunction

from flask import Flask, Request, current_app, has_request_context, request
from flask.json.provider import DefaultJSONProvider
from flask_smorest import Api, abort
from webargs.flaskparser import FlaskParser
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.utils import cached_property
from werkzeug.wsgi import LimitedStream


class _BodyTooLarge(RequestEntityTooLarge):
    """The body is over MAX_CONTENT_LENGTH (rather than a part of it over a form limit)."""


class _BodyLimit(LimitedStream):
    """MAX_CONTENT_LENGTH on a body the server delimits (chunked or not), exactly.

    werkzeug's own guard refuses as soon as a read is tried at the limit, so a body of exactly
    MAX_CONTENT_LENGTH bytes got a 413; this one refuses only when the body goes on past it.
    """

    def __init__(self, source, limit):
        super().__init__(source, limit, is_max=True)
        self._source = source

    def on_exhausted(self):
        if self._source.read(1):
            raise _BodyTooLarge()


class _PartCounter:
    """A multipart body as the form parser reads it, counting its boundary delimiters: when the
    parser refuses the body, the count says whether it had too many parts."""

    def __init__(self, stream, boundary):
        self._stream = stream
        self._delimiter = b"--" + boundary
        self._tail = b""
        self.delimiters = 0

    def read(self, size=-1):
        data = self._stream.read(size)
        # The tail is shorter than a delimiter: one split across two reads is counted once.
        window = self._tail + data
        self.delimiters += window.count(self._delimiter)
        self._tail = window[-(len(self._delimiter) - 1) :] if len(self._delimiter) > 1 else b""
        return data


class UploadRequest(Request):
    """A request whose uploads stay in memory (bounded by MAX_CONTENT_LENGTH), never on disk."""

    @cached_property
    def stream(self):
        limit = self.max_content_length
        if limit is None or "wsgi.input_terminated" not in self.environ:
            return super().stream
        if self.content_length is not None and self.content_length > limit:
            raise _BodyTooLarge()
        return _BodyLimit(self.environ["wsgi.input"], limit)

    def _get_stream_for_parsing(self):
        stream = super()._get_stream_for_parsing()
        boundary = self.mimetype_params.get("boundary")
        if self.mimetype == "multipart/form-data" and boundary:
            stream = self._part_counter = _PartCounter(stream, boundary.encode("ascii", "replace"))
        return stream

    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        return io.BytesIO()

    def make_form_data_parser(self):
        parser = super().make_form_data_parser()
        parser.silent = False  # a body that cannot be parsed is an error to report, not "no files"
        return parser

    def _load_form_data(self):
        try:
            super()._load_form_data()
        except UnicodeDecodeError:
            abort(400, message=f"malformed {self.mimetype} body: its text, filenames included, must be UTF-8")
        except ValueError as exc:
            abort(400, message=f"malformed {self.mimetype} body: {exc}")
        except RequestEntityTooLarge as exc:
            limit = self.max_content_length
            counter = getattr(self, "_part_counter", None)
            if isinstance(exc, _BodyTooLarge) or counter is None or (
                limit is not None and self.content_length is not None and self.content_length > limit
            ):
                raise
            # Else the form parser refused a part: say which limit, with the setting behind it. A
            # 422, as for too many files: 413 stays "over MAX_CONTENT_LENGTH", whoever answers it
            # (nginx answers that one itself, and its own 413 replaces the service's).
            if counter.delimiters > self.max_form_parts:
                max_files = current_app.config["MAX_FILES"]
                abort(
                    422,
                    message=f"the form has more than {self.max_form_parts} parts: send at most {max_files} "
                    "image files (MAX_FILES), each as a part named image_file",
                )
            abort(
                422,
                message=f"a form field is larger than {self.max_form_memory_size} bytes: send each image as "
                "a file (a part with a filename)",
            )


_NAMES_SHOWN = 5
_NAME_LENGTH = 40


def _names(names):
    """Up to a few field names, each cut short and quoted (control characters escaped)."""
    names = list(dict.fromkeys(names))  # once each, in the order sent
    shown = ", ".join(repr(name if len(name) <= _NAME_LENGTH else name[:_NAME_LENGTH] + "…")
                      for name in names[:_NAMES_SHOWN])
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def _plural(word, count):
    return word if count == 1 else word + "s"


def what_arrived(req):
    """One phrase saying what a request without the expected upload did carry: its multipart fields
    and files by name, or what its body was instead."""
    if req.mimetype != "multipart/form-data":
        if not req.mimetype and not req.content_length:
            return "the request has no body"
        return f"the request body is {req.mimetype or 'of no Content-Type'}, not multipart/form-data"
    files, fields = list(req.files.keys()), list(req.form.keys())
    if not files and not fields:
        return "the multipart request has no fields"
    parts = []
    if files:
        parts.append(f"the file {_plural('field', len(files))} {_names(files)}")
    if fields:
        parts.append(f"the text {_plural('field', len(fields))} {_names(fields)} (no filename)")
    return "the request has " + " and ".join(parts)


class UploadParser(FlaskParser):
    """webargs' parser, saying what did arrive when a required upload is missing, in the API's one
    error shape: e.g. ``no image_file: the request has the file field 'file'; send each image as
    multipart field image_file``."""

    MISSING = "Missing data for required field."

    def handle_error(self, error, req, schema, *, error_status_code, error_headers):
        missing = [name for name, problems in (error.messages.get("files") or {}).items()
                   if isinstance(problems, list) and self.MISSING in problems]
        if missing:
            name = missing[0]
            message = f"no {name}: {what_arrived(req)}; send each image as multipart field {name}"
            if name in req.form:
                message += f" (with curl: -F {name}=@<path>)"
            abort(error_status_code or self.DEFAULT_VALIDATION_STATUS, exc=error, messages=error.messages,
                  message=message, headers=error_headers)
        super().handle_error(
            error, req, schema, error_status_code=error_status_code, error_headers=error_headers
        )


class ServiceFlask(Flask):
    """The service's Flask app: uploads kept in memory (:class:`UploadRequest`), and each view and
    hook looked at once, not on every call, for whether it is a coroutine function.

    Flask asks that of every hook and view a request runs, and flask-smorest of each of its
    decorator layers: about a dozen times per prediction, each through ``inspect``. The
    functions an app runs are fixed once its blueprints are registered, so the answer is kept
    (for at most ``_SYNC_VIEWS_KEPT`` of them: a callable made anew per request is not kept).
    """

    request_class = UploadRequest
    _SYNC_VIEWS_KEPT = 1024

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._sync_views = {}

    def ensure_sync(self, func):
        try:
            return self._sync_views[func]
        except (KeyError, TypeError):  # TypeError: an unhashable callable, looked at every time
            pass
        synced = self.async_to_sync(func) if iscoroutinefunction(func) else func
        if len(self._sync_views) < self._SYNC_VIEWS_KEPT:
            try:
                self._sync_views[func] = synced
            except TypeError:
                pass
        return synced


class StrictJSONProvider(DefaultJSONProvider):
    """Flask's JSON, refusing NaN and infinity: they are not JSON, and clients' parsers reject them.

    A value that cannot be written makes the request a JSON 500, never an answer that is not JSON.
    """

    def dumps(self, obj, **kwargs):
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


def _no_sniffing(response):
    # Filenames are echoed back as sent: a browser must never read a JSON answer as HTML.
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


class ServiceApi(Api):
    """flask-smorest's Api, keeping the headers an HTTP error defines (``Allow`` on a 405), and
    giving every error a ``message`` (werkzeug's own errors, a 413 or a 404, come without one).

    It also sets how every response of the app is written: strict JSON, and
    ``X-Content-Type-Options: nosniff``.
    """

    def init_app(self, app, *args, **kwargs):
        strict = StrictJSONProvider(app)
        for option in ("ensure_ascii", "sort_keys", "compact", "mimetype"):
            setattr(strict, option, getattr(app.json, option))  # as the factory set them
        app.json = strict
        app.after_request(_no_sniffing)
        super().init_app(app, *args, **kwargs)

    def handle_http_exception(self, error):
        payload, code, headers = super().handle_http_exception(error)
        if "message" not in payload:
            limit = current_app.config.get("MAX_CONTENT_LENGTH") if has_request_context() else None
            length = request.content_length if has_request_context() else None
            if isinstance(error, RequestEntityTooLarge) and limit and (length is None or length > limit):
                payload["message"] = f"the request body is larger than {limit} bytes (MAX_CONTENT_LENGTH)"
            elif error.description:
                payload["message"] = error.description
        defined = {name: value for name, value in error.get_headers() if name.lower() != "content-type"}
        return payload, code, {**defined, **(headers or {})}

    def _register_pagination_header(self):
        """No endpoint paginates: keep X-Pagination and PaginationMetadata out of the spec."""
