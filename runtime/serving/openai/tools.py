"""Tool calling for the chat endpoint: checking `tools`/`tool_choice`, and turning the model's text into
OpenAI `tool_calls`, streamed or not.

The model's tool-call format (what it writes, what the default prompt asks for):

* **hermes** (the default; Qwen, Hermes and the ChatML-style Nemotron templates): each call is a JSON object
  `{"name": ..., "arguments": {...}}` between `<tool_call>` and `</tool_call>`; several calls are several
  blocks. `"parameters"` is accepted for `"arguments"`, and `arguments` may be a JSON string.
* **nemotron** (chosen when the chat template mentions `<TOOLCALL>`, as Llama-Nemotron / Nemotron-Nano-2
  templates do): one block `<TOOLCALL>[{"name": ..., "arguments": {...}}, ...]</TOOLCALL>`.

`tool_choice`:

* `"none"`: the tools are still rendered into the prompt (as vLLM does by default), nothing is parsed: the
  answer is plain content, finish_reason as without tools.
* `"auto"` (the default when tools are given): the output is parsed. Text outside the blocks is `content`
  (whitespace next to a block is dropped; `null` when nothing is left); each well-formed block is one entry of
  `tool_calls` (ids `call_<24 hex>`), and finish_reason is `"tool_calls"` when the model stopped by itself. A
  block that is not a call (not an object, no `"name"` string before it ends) stays in `content` verbatim.
  `arguments` is the model's own JSON text of the value (not re-serialized), so a streamed answer joins to
  exactly the non-streamed one. `parallel_tool_calls: false` keeps the first call only.
* `"required"` and a named function are enforced by structured output (`Settings.structured`, kind
  `json_schema`), like vLLM: for `"required"` the whole output is a JSON array of one or more
  `{"name": <one of the tools>, "arguments": <its parameters schema>}` objects (at most one item with
  `parallel_tool_calls: false`); for a named function the whole output is that function's arguments object.
  The answer has `content: null`, the calls in `tool_calls` and finish_reason `"tool_calls"` (vLLM and OpenAI
  say `"stop"` for a named function; one reason for "the model called tools" is easier for clients). They
  need a mode with structured output (ar, spec, quad) and cannot be combined with `response_format`.
  The schema asks the grammar engine for compact JSON with `", "` and `": "` separators (llguidance's
  `x-guidance` options; other engines ignore the key) so that a forced answer cannot run on in whitespace.

`strict` on a function is accepted; `required`/named calls always follow the schema, `auto` calls are parsed
as written (not constrained).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .protocol import APIError, ChatRequest

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ARGUMENT_KEYS = ("arguments", "parameters")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
STRUCTURED_MODES = ("ar", "spec", "quad")
EMPTY_PARAMETERS: dict = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolFormat:
    """How a model writes tool calls: a block between two tags holding one call object, or an array of them."""

    name: str
    open: str
    close: str
    array: bool


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", array=False)
NEMOTRON = ToolFormat("nemotron", "<TOOLCALL>", "</TOOLCALL>", array=True)


def format_for_template(source: str | None) -> ToolFormat:
    """The tool-call format a chat template's model writes: nemotron when the template uses `<TOOLCALL>`,
    else hermes (also what the default tools prompt of runtime/serving/chat_template.py asks for)."""
    if source and NEMOTRON.open in source:
        return NEMOTRON
    return HERMES


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# -- checking the request ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolPlan:
    """What one chat request does with tools (None from `plan_tools` when it has nothing to do with them)."""

    tools: list[dict]           # the request's tools, as the chat template gets them
    choice: str                 # "none" | "auto" | "required" | "named"
    named: str | None = None    # the function of a named tool_choice
    parallel: bool = True
    format: ToolFormat = HERMES
    structured: tuple[str, str] | None = None  # the (kind, spec) enforcing required / named

    @property
    def parses(self) -> bool:
        return self.choice != "none"


def _check_parameters(name: str, schema: dict | None) -> None:
    if schema is None:
        return
    kind = schema.get("type")
    if kind is not None and kind != "object":
        raise APIError(f"Invalid schema for function '{name}': parameters must be a JSON Schema of "
                       f"'type: \"object\"', got 'type: {json.dumps(kind)}'", param="tools")
    try:
        import jsonschema
    except ImportError:  # without it the grammar engine still refuses a schema it cannot compile
        return
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise APIError(f"Invalid schema for function '{name}': {exc.message}", param="tools") from None


def _embedded(schema: dict, prefix: str, defs: dict) -> dict:
    """A function's parameters schema to nest inside the `required` schema: its definitions (`$defs`,
    `definitions`) move to the root's `$defs` under `prefix`, and its references follow them."""
    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                for root in ("#/$defs/", "#/definitions/"):
                    if value.startswith(root):
                        value = "#/$defs/" + prefix + value[len(root):]
                out[key] = value
            else:
                out[key] = walk(value)
        return out

    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions", "$schema", "$id")}
    for key in ("definitions", "$defs"):
        for name, definition in (schema.get(key) or {}).items():
            defs[prefix + name] = walk(definition)
    return walk(body)


def call_schema(tools: list[dict], parallel: bool) -> dict:
    """The JSON schema of a `required` answer: an array of calls of the given tools."""
    items, defs = [], {}
    for number, tool in enumerate(tools):
        function = tool["function"]
        parameters = _embedded(function.get("parameters") or EMPTY_PARAMETERS, f"tool{number}_", defs)
        items.append({"type": "object",
                      "properties": {"name": {"type": "string", "enum": [function["name"]]},
                                     "arguments": parameters},
                      "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return {**schema, "x-guidance": JSON_OPTIONS}


def named_schema(tool: dict) -> dict:
    """The JSON schema of a named tool_choice's answer: the function's arguments object."""
    parameters = tool["function"].get("parameters") or EMPTY_PARAMETERS
    return {**parameters, "x-guidance": JSON_OPTIONS}


def plan_tools(request: ChatRequest, fmt: ToolFormat = HERMES, mode: str | None = None) -> ToolPlan | None:
    """Check the tool fields of a chat request (APIError 400 naming the problem); None without tools."""
    check_tool_messages(request)
    choice = request.tool_choice
    if not request.tools:
        if choice is not None and choice != "none":
            raise APIError("'tool_choice' is only allowed when 'tools' are given", param="tool_choice")
        if request.parallel_tool_calls is not None:
            raise APIError("'parallel_tool_calls' is only allowed when 'tools' are given",
                           param="parallel_tool_calls")
        return None
    tools = [tool.model_dump(exclude_unset=True) for tool in request.tools]
    names: set[str] = set()
    for tool in tools:
        name = tool["function"]["name"]
        if not NAME_PATTERN.match(name):
            raise APIError(f"Invalid function name '{name}': use a-z, A-Z, 0-9, '_' and '-', at most 64 "
                           "characters", param="tools")
        if name in names:
            raise APIError(f"function '{name}' is given twice in 'tools'", param="tools")
        names.add(name)
        _check_parameters(name, tool["function"].get("parameters"))
    parallel = request.parallel_tool_calls is not False
    if choice is None:
        choice = "auto"
    named = None
    if not isinstance(choice, str):
        named = choice.function.name
        if named not in names:
            raise APIError(f"tool_choice names the function '{named}', which is not among the tools "
                           f"({', '.join(sorted(names))})", param="tool_choice")
        choice = "named"
    structured = None
    if choice in ("required", "named"):
        if mode is not None and mode not in STRUCTURED_MODES:
            raise APIError(f"tool_choice '{choice if named is None else named}' is enforced by structured "
                           f"output, which needs mode {', '.join(STRUCTURED_MODES)} (got mode '{mode}')",
                           param="tool_choice")
        if named is not None:
            schema = named_schema(next(t for t in tools if t["function"]["name"] == named))
        else:
            schema = call_schema(tools, parallel)
        structured = ("json_schema", json.dumps(schema, ensure_ascii=False))
    return ToolPlan(tools, choice, named, parallel, fmt, structured)


def check_tool_messages(request: ChatRequest) -> None:
    """OpenAI's message rules: tool_calls only on assistant messages, tool_call_id only (and always) on tool
    messages, and each tool message answers a call of an earlier assistant message."""
    called: set[str] = set()
    for number, message in enumerate(request.messages):
        where = f"messages[{number}]"
        if message.tool_calls is not None and message.role != "assistant":
            raise APIError(f"{where}: only assistant messages have 'tool_calls'", param=f"{where}.tool_calls")
        if message.role == "tool":
            if message.tool_call_id is None:
                raise APIError(f"{where}: a tool message needs 'tool_call_id'", param=f"{where}.tool_call_id")
            if message.tool_call_id not in called:
                raise APIError(f"{where}: a tool message must answer a call of an earlier assistant message "
                               f"(no tool call has the id '{message.tool_call_id}')", param=f"{where}.tool_call_id")
        elif message.tool_call_id is not None:
            raise APIError(f"{where}: only tool messages have 'tool_call_id'", param=f"{where}.tool_call_id")
        for call in message.tool_calls or ():
            called.add(call.id)


def template_messages(request: ChatRequest) -> list[dict]:
    """The messages as the chat template gets them: assistant `tool_calls` with `arguments` parsed into an
    object where it is one (templates write `arguments | tojson`; vLLM does the same), tool messages with
    `tool_call_id` (and `name` when given)."""
    out = []
    for message in request.messages:
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name:
            item["name"] = message.name
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                try:
                    arguments: Any = json.loads(call.function.arguments)
                except json.JSONDecodeError:
                    arguments = call.function.arguments
                if not isinstance(arguments, dict):
                    arguments = call.function.arguments
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            item["tool_calls"] = calls
        out.append(item)
    return out


# -- reading the model's output ---------------------------------------------------------------------------------

_WS = " \t\r\n"


class CallScanner:
    """Reads one call object `{"name": ..., "arguments": ...}` character by character (resumable), finding the
    name and the raw text of the arguments value. `feed` returns how many characters belonged to the object;
    after the object closes it takes no more."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.stack: list[str] = []
        self.started = False
        self.closed = False
        self.broken = False
        self.in_string = False
        self.escape = False
        self.expect = "key"        # at depth 1: key | colon | value | comma
        self.key_start = -1
        self.key: str | None = None
        self.value_key: str | None = None
        self.value_start = -1
        self.scalar = False        # a depth-1 number/literal value is being read
        self.name: str | None = None
        self.name_start = -1
        self.args_start = -1
        self.args_end = -1
        self.args_string = False

    @property
    def done(self) -> bool:
        return self.closed or self.broken

    def feed(self, chunk: str) -> int:
        used = 0
        for char in chunk:
            if self.done:
                break
            self._char(char)
            used += 1
            if self.broken:  # the character that broke it is not part of the object
                self.text.pop()
        return used

    def _char(self, c: str) -> None:
        i = len(self.text)
        self.text.append(c)
        if not self.started:
            if c in _WS:
                return
            if c != "{":
                self.broken = True
                return
            self.started = True
            self.stack.append("{")
            return
        if self.in_string:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == '"':
                self.in_string = False
                if len(self.stack) == 1:
                    self._string_end(i)
            return
        depth = len(self.stack)
        if depth == 1 and self.scalar:
            if c in _WS or c in ",}":
                self.scalar = False
                self._value_end(i)
            else:
                return
        if c == '"':
            self.in_string = True
            if depth == 1:
                if self.expect == "key":
                    self.key_start = i
                elif self.expect == "value":
                    self._value_start(i, string=True)
                else:
                    self.broken = True
            return
        if c in _WS:
            return
        if c in "{[":
            if depth == 1:
                if self.expect != "value":
                    self.broken = True
                    return
                self._value_start(i, string=False)
            self.stack.append(c)
            return
        if c in "}]":
            if self.stack[-1] != ("{" if c == "}" else "["):
                self.broken = True
                return
            self.stack.pop()
            if depth == 2:
                self._value_end(i + 1)
            elif depth == 1:
                if self.expect not in ("comma", "key"):
                    self.broken = True
                    return
                self.closed = True
            return
        if depth > 1:
            return
        if c == ":" and self.expect == "colon":
            self.expect = "value"
        elif c == "," and self.expect == "comma":
            self.expect = "key"
        elif self.expect == "value":  # a number or literal
            self._value_start(i, string=False)
            self.scalar = True
        else:
            self.broken = True

    def _string_end(self, i: int) -> None:
        if self.expect == "key":
            try:
                self.key = json.loads("".join(self.text[self.key_start:i + 1]))
            except json.JSONDecodeError:
                self.broken = True
                return
            self.expect = "colon"
        else:
            self._value_end(i + 1)

    def _value_start(self, i: int, string: bool) -> None:
        self.value_key = self.key
        self.value_start = i
        if self.value_key == "name" and self.name is None and self.name_start < 0:
            self.name_start = i if string else -2
        if self.value_key in ARGUMENT_KEYS and self.args_start < 0:
            self.args_start = i
            self.args_string = string
        self.expect = "value_open"

    def _value_end(self, end: int) -> None:
        if self.value_key == "name" and self.name_start == self.value_start:
            try:
                self.name = json.loads("".join(self.text[self.value_start:end]))
            except json.JSONDecodeError:
                self.broken = True
                return
        if self.args_start == self.value_start and self.args_end < 0:
            self.args_end = end
        self.expect = "comma"

    def arguments(self, final: bool = False, skip: int = 0) -> str:
        """The arguments text read so far (a prefix of the final one) after its first `skip` characters;
        final: `{}` when there were none."""
        if self.args_start < 0:
            return "{}"[skip:] if final else ""
        if self.args_string:  # a JSON string holding the arguments: only known once it is complete
            if self.args_end < 0:
                return ""
            value = json.loads("".join(self.text[self.args_start:self.args_end]))
            return value[skip:] if isinstance(value, str) else ""
        end = self.args_end if self.args_end >= 0 else len(self.text)
        return "".join(self.text[self.args_start + skip:end])


class ListScanner:
    """Reads a JSON array of call objects, each through a CallScanner."""

    def __init__(self) -> None:
        self.calls: list[CallScanner] = []
        self.state = "start"   # start | item | after | closed | broken

    @property
    def done(self) -> bool:
        return self.state in ("closed", "broken")

    def feed(self, chunk: str) -> int:
        i = 0
        while i < len(chunk) and not self.done:
            if self.state == "item":
                call = self.calls[-1]
                i += call.feed(chunk[i:])
                if call.broken:
                    self.state = "broken"
                elif call.closed:
                    self.state = "after"
                continue
            c = chunk[i]
            i += 1
            if c in _WS:
                continue
            if self.state == "start":
                self.state = "next" if c == "[" else "broken"
            elif self.state == "next":
                if c == "]" and not self.calls:
                    self.state = "closed"
                elif c == "{":
                    self.calls.append(CallScanner())
                    self.calls[-1].feed(c)
                    self.state = "item"
                else:
                    self.state = "broken"
            elif self.state == "after":
                self.state = {",": "next", "]": "closed"}.get(c, "broken")
        return i


Event = tuple  # ("content", text) | ("call", index, name) | ("args", index, text)


@dataclass
class _Tracked:
    scanner: CallScanner
    index: int = -1   # -1: not announced yet
    sent: int = 0     # characters of arguments sent


class _Calls:
    """Turns scanners' progress into call/args events, in order, with global indices."""

    def __init__(self, limit: int | None) -> None:
        self.tracked: list[_Tracked] = []
        self.count = 0
        self.limit = limit

    def add(self, scanner: CallScanner) -> None:
        self.tracked.append(_Tracked(scanner))

    def sync(self, final: bool = False) -> list[Event]:
        events: list[Event] = []
        for item in self.tracked:
            scanner = item.scanner
            if item.index < 0:
                if scanner.name is None or (self.limit is not None and self.count >= self.limit):
                    continue
                item.index = self.count
                self.count += 1
                events.append(("call", item.index, scanner.name))
            text = scanner.arguments(final=final or scanner.done, skip=item.sent)
            if text:
                events.append(("args", item.index, text))
                item.sent += len(text)
        return events


def _held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of text could be the start of tag."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class TaggedParser:
    """The `auto` parser: content outside the format's blocks, calls inside them; feed() pieces, then finish().
    The events depend only on the whole text, not on how it was cut into pieces."""

    def __init__(self, fmt: ToolFormat, parallel: bool = True) -> None:
        self.fmt = fmt
        self.calls = _Calls(None if parallel else 1)
        self.pending = ""
        self.state = "out"
        self.lstrip = False
        self.ws_hold = ""
        self.tag_ws = ""
        self.block: CallScanner | ListScanner | None = None
        self.block_raw = ""
        self.committed = False

    def _content(self, text: str, events: list[Event]) -> None:
        if self.lstrip:
            text = text.lstrip(_WS)
            if not text:
                return
            self.lstrip = False
        text = self.ws_hold + text
        body = text.rstrip(_WS)
        self.ws_hold = text[len(body):]
        if body:
            events.append(("content", body))

    def _scanners(self) -> list[CallScanner]:
        if isinstance(self.block, ListScanner):
            return self.block.calls
        return [self.block] if self.block is not None else []

    def _track(self, known: int) -> None:
        for scanner in self._scanners()[known:]:
            self.calls.add(scanner)

    def _feed_block(self, text: str, events: list[Event]) -> str:
        """Feed text to the block; returns the rest of it when the block turns out not to be a call (that rest
        is read again as content). Until the first call's name is known the block is read one character at a
        time, so that it is rejected at the same character however the text was cut into pieces."""
        assert self.block is not None
        i = 0
        while not self.committed and i < len(text):
            known = len(self._scanners())
            self.block.feed(text[i])
            self.block_raw += text[i]
            i += 1
            self._track(known)
            scanners = self._scanners()
            first = scanners[0] if scanners else None
            if first is not None and first.name is not None:
                self.committed = True
            elif self.block.done or (first is not None and first.done):
                self._reject(events)
                return text[i:]
        if i < len(text):
            known = len(self._scanners())
            self.block.feed(text[i:])
            self._track(known)
        if self.committed:
            events += self.calls.sync()
        return ""

    def _reject(self, events: list[Event]) -> None:
        """The block is not a call: it is content, verbatim, with the whitespace before it."""
        for scanner in self._scanners():
            self.calls.tracked = [t for t in self.calls.tracked if t.scanner is not scanner]
        raw = self.tag_ws + self.fmt.open + self.block_raw
        self.state, self.block, self.block_raw, self.tag_ws = "out", None, "", ""
        self.lstrip, self.ws_hold = False, ""
        body = raw.rstrip(_WS)
        self.ws_hold = raw[len(body):]
        if body:
            events.append(("content", body))

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        self.pending += text
        while self.pending:
            if self.state == "out":
                at = self.pending.find(self.fmt.open)
                if at < 0:
                    safe = len(self.pending) - _held_prefix(self.pending, self.fmt.open)
                    self._content(self.pending[:safe], events)
                    self.pending = self.pending[safe:]
                    break
                self._content(self.pending[:at], events)
                self.pending = self.pending[at + len(self.fmt.open):]
                self.tag_ws, self.ws_hold, self.lstrip = self.ws_hold, "", False
                self.state = "block"
                self.block = ListScanner() if self.fmt.array else CallScanner()
                if isinstance(self.block, CallScanner):
                    self.calls.add(self.block)
                self.block_raw, self.committed = "", False
            else:
                at = self.pending.find(self.fmt.close)
                if at < 0:
                    safe = len(self.pending) - _held_prefix(self.pending, self.fmt.close)
                    chunk, rest = self.pending[:safe], self.pending[safe:]
                    left = self._feed_block(chunk, events)
                    self.pending = left + rest
                    if self.state == "block":
                        break
                    continue
                chunk, rest = self.pending[:at], self.pending[at + len(self.fmt.close):]
                left = self._feed_block(chunk, events)
                if self.state == "out":  # not a call: the rest, close tag included, is read as content
                    self.pending = left + self.fmt.close + rest
                    continue
                self.pending = rest
                if not self.committed:  # closed before it named a function: content, verbatim
                    self.block_raw += self.fmt.close
                    self._reject(events)
                    continue
                events += self.calls.sync(final=True)
                self.state, self.block, self.tag_ws = "out", None, ""
                self.lstrip = True
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self.state == "block":
            rest, self.pending = self.pending, ""
            left = self._feed_block(rest, events)
            if self.state == "out":
                events += self.feed(left)
            elif self.committed:
                events += self.calls.sync(final=True)
                self.state, self.block = "out", None
            else:
                self._reject(events)
        rest, self.pending = self.pending, ""
        if self.lstrip:
            rest = rest.lstrip(_WS)
        tail = self.ws_hold + rest
        self.ws_hold = ""
        if tail:
            events.append(("content", tail))
        return events


class RequiredParser:
    """A `required` answer: the whole output is a JSON array of calls."""

    def __init__(self, parallel: bool = True) -> None:
        self.scanner = ListScanner()
        self.calls = _Calls(None if parallel else 1)

    def feed(self, text: str) -> list[Event]:
        known = len(self.scanner.calls)
        self.scanner.feed(text)
        for scanner in self.scanner.calls[known:]:
            self.calls.add(scanner)
        return self.calls.sync()

    def finish(self) -> list[Event]:
        return self.calls.sync(final=True)


class NamedParser:
    """A named function's answer: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, text: str) -> list[Event]:
        events: list[Event] = []
        if not self.started:
            events.append(("call", 0, self.name))
            self.started = True
        if text:
            events.append(("args", 0, text))
        return events

    def finish(self) -> list[Event]:
        return self.feed("")


def parser_for(plan: ToolPlan) -> TaggedParser | RequiredParser | NamedParser:
    if plan.choice == "named":
        assert plan.named is not None
        return NamedParser(plan.named)
    if plan.choice == "required":
        return RequiredParser(plan.parallel)
    return TaggedParser(plan.format, plan.parallel)


# -- answers ----------------------------------------------------------------------------------------------------

def finish_reason(called: bool, reason: str) -> str:
    """"tool_calls" when the answer has calls and the model stopped by itself; the reason otherwise."""
    return "tool_calls" if called and reason == "stop" else reason


def chat_message(plan: ToolPlan, text: str, new_id: Callable[[], str] = new_call_id) -> tuple[dict, bool]:
    """The assistant message of a non-streamed answer, and whether it has tool calls."""
    if not plan.parses:
        return {"role": "assistant", "content": text}, False
    parser = parser_for(plan)
    events = parser.feed(text) + parser.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    calls: list[dict] = []
    for event in events:
        if event[0] == "call":
            calls.append({"id": new_id(), "type": "function", "function": {"name": event[2], "arguments": ""}})
        elif event[0] == "args":
            calls[event[1]]["function"]["arguments"] += event[2]
    message: dict = {"role": "assistant", "content": content or (None if calls else content)}
    if calls:
        message["tool_calls"] = calls
    return message, bool(calls)


@dataclass
class ToolStream:
    """The chat deltas of one streamed choice: feed() each text piece, then finish(); each returns the deltas
    to send (`{"content": ...}` or `{"tool_calls": [...]}`), in order."""

    plan: ToolPlan
    new_id: Callable[[], str] = new_call_id
    parser: Any = None
    called: bool = False
    ids: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.parser = parser_for(self.plan) if self.plan.parses else None

    def _deltas(self, events: list[Event]) -> list[dict]:
        out = []
        for event in events:
            if event[0] == "content":
                out.append({"content": event[1]})
            elif event[0] == "call":
                self.called = True
                self.ids[event[1]] = self.new_id()
                out.append({"tool_calls": [{"index": event[1], "id": self.ids[event[1]], "type": "function",
                                            "function": {"name": event[2], "arguments": ""}}]})
            else:
                out.append({"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]})
        return out

    def feed(self, text: str) -> list[dict]:
        if self.parser is None:
            return [{"content": text}] if text else []
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict]:
        if self.parser is None:
            return []
        return self._deltas(self.parser.finish())
