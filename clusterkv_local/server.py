"""An OpenAI-compatible HTTP server over one Llama, on the standard library only.

    clusterkv-local serve -m MODEL [--host 127.0.0.1] [--port 8000] [-ngl -1] [--embedding]

Endpoints (the subset of OpenAI's API that llama-cpp-python's server offers):
- `POST /v1/completions` and `POST /v1/chat/completions`: the bodies of OpenAI's API, passed to
  Llama.create_completion / create_chat_completion (so tools, tool_choice, response_format, stop,
  seed, logprobs work as there); `"stream": true` answers with server-sent events (one
  `data: {chunk}` per chunk, then `data: [DONE]`);
- `POST /v1/embeddings` (a server started with --embedding);
- `GET /v1/models`, `GET /health`.

One Llama serves one request at a time (a lock; llama-cpp-python's server does the same), so
requests queue. Keys a request may carry that do not change the output (`user`, `n` of 1,
`stream_options`, ...) are ignored, and a null value means the default; a value the runtime
cannot honour (`n` > 1, a wrong type) is a 400 with OpenAI's error body `{"error": {"message",
"type", "param", "code"}}`, as is any ValueError / TypeError the Llama raises.
"""
import inspect
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

MAX_BODY = 64 << 20   # bytes of a request body


class RequestError(Exception):
    """A request the server refuses (HTTP status, OpenAI error type)."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: Optional[str] = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def _keywords(method: Callable) -> set:
    return {name for name, p in inspect.signature(method).parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _request_args(body: Dict[str, Any], method: Callable, first: str) -> Dict[str, Any]:
    """The body's keys that `method` takes (its first argument named `first`), OpenAI's spellings
    mapped to the Llama's; unknown keys are dropped."""
    args = {k: v for k, v in body.items() if v is not None}   # null: the default, as unset
    if args.get("n", 1) != 1:
        raise RequestError("n must be 1 (one choice per request)", param="n")
    if first not in args:
        raise RequestError("'%s' is required" % first, param=first)
    if "max_completion_tokens" in args and "max_tokens" not in args:
        args["max_tokens"] = args.pop("max_completion_tokens")
    if isinstance(args.get("logit_bias"), dict):   # JSON object keys are strings
        try:
            args["logit_bias"] = {int(k): float(v) for k, v in args["logit_bias"].items()}
        except (TypeError, ValueError):
            raise RequestError("logit_bias maps token ids to numbers", param="logit_bias")
    accepted = _keywords(method) - {"logits_processor", "stopping_criteria"}
    return {k: v for k, v in args.items() if k in accepted}


class _Handler(BaseHTTPRequestHandler):
    server_version = "clusterkv_local"
    protocol_version = "HTTP/1.1"
    app: "Server"   # set on the subclass Server makes

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.app.verbose:
            super().log_message(fmt, *args)

    # --- plumbing ---

    def _send_json(self, status: int, value: Any) -> None:
        data = json.dumps(value, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: RequestError) -> None:
        self._send_json(e.status, {"error": {"message": str(e), "type": e.kind, "param": e.param,
                                             "code": None}})

    def _send_events(self, chunks: Iterator[Dict[str, Any]]) -> None:
        """Server-sent events, one per chunk; the first chunk is made before the headers go, so
        a parameter error is still a 400."""
        first = next(chunks, None)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("Access-Control-Allow-Origin", "*")
        self.end_headers()
        self.close_connection = True

        def event(data: bytes) -> None:
            self.wfile.write(b"data: " + data + b"\n\n")
            self.wfile.flush()

        try:
            if first is not None:
                event(json.dumps(first, ensure_ascii=False).encode())
            for chunk in chunks:
                event(json.dumps(chunk, ensure_ascii=False).encode())
            event(b"[DONE]")
        except (BrokenPipeError, ConnectionResetError):
            pass   # the client left: generation stops here
        except Exception as e:   # noqa: BLE001 - the status line is gone: say it in the stream
            event(json.dumps({"error": {"message": "%s: %s" % (type(e).__name__, e),
                                        "type": "server_error", "param": None, "code": None}}).encode())
        finally:
            close = getattr(chunks, "close", None)
            if close:
                close()

    def _body(self) -> Dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError("bad Content-Length")
        if length > MAX_BODY:
            raise RequestError("request body over %d bytes" % MAX_BODY, status=413)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError as e:
            raise RequestError("the body is not JSON: %s" % e)
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    # --- routes ---

    def do_OPTIONS(self) -> None:   # CORS preflight of browser clients
        self.send_response(204)
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Content-Type, Authorization")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [
                {"id": self.app.model_name, "object": "model", "created": self.app.created,
                 "owned_by": "clusterkv_local"}]})
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._send_error(RequestError("no route GET %s" % self.path, 404, "not_found_error"))

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {"/v1/completions": self.app.completion, "/v1/chat/completions": self.app.chat,
                  "/v1/embeddings": self.app.embedding}
        if path not in routes:
            self._send_error(RequestError("no route POST %s" % self.path, 404, "not_found_error"))
            return
        try:
            body = self._body()
            with self.app.lock:
                streamed, result = routes[path](body)
                if streamed:
                    self._send_events(result)
                else:
                    self._send_json(200, result)
        except RequestError as e:
            self._send_error(e)
        except (ValueError, TypeError, KeyError) as e:
            self._send_error(RequestError(str(e)))
        except Exception as e:   # noqa: BLE001 - the server must answer, not die
            self._send_error(RequestError("%s: %s" % (type(e).__name__, e), 500, "server_error"))


class Server:
    """Serves `llm` at http://host:port (port 0: any free one; see .port). start() runs it in a
    thread, serve_forever() in this one; close() stops it (the Llama stays open)."""

    def __init__(self, llm: Any, host: str = "127.0.0.1", port: int = 8000,
                 model_name: Optional[str] = None, verbose: bool = False):
        self.llm = llm
        self.model_name = model_name or llm.model_path
        self.created = int(time.time())
        self.verbose = verbose
        self.lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"app": self})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.port)

    def start(self) -> "Server":
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join()

    # --- what each route does with the Llama (called under the lock) ---

    def _generate(self, method: Callable, body: Dict[str, Any], first: str
                  ) -> Tuple[bool, Any]:
        args = _request_args(body, method, first)
        args["model"] = self.model_name
        stream = bool(args.get("stream"))
        result = method(**args)
        return stream, result

    def completion(self, body: Dict[str, Any]) -> Tuple[bool, Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise RequestError("one prompt per request", param="prompt")
            body = dict(body, prompt=prompt[0])
        return self._generate(self.llm.create_completion, body, "prompt")

    def chat(self, body: Dict[str, Any]) -> Tuple[bool, Any]:
        return self._generate(self.llm.create_chat_completion, body, "messages")

    def embedding(self, body: Dict[str, Any]) -> Tuple[bool, Any]:
        if not getattr(self.llm, "_embedding", False):
            raise RequestError("this server was started without --embedding")
        if "input" not in body:
            raise RequestError("'input' is required", param="input")
        return False, self.llm.create_embedding(body["input"], model=self.model_name)
