"""ComfyUI's own prompt executor (``execution.PromptExecutor``, the one the server's queue runs) in process: the
pack's nodes registered as ``nodes.load_custom_node`` registers them, plus source nodes that hand a test's tiny
objects (a MODEL, a CLIP) into the graph. The executor's caching, list handling (``is_output_list`` /
``is_input_list``) and interrupt handling are the real ones; only the websocket side is a message log."""
from __future__ import annotations

import itertools

_OBJECTS: dict = {}
_PROMPT_IDS = itertools.count(1)


class MessageLog:
    """The server object the executor talks to: it records what the server would send to the browser."""

    client_id = None
    last_node_id = None

    def __init__(self):
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class TestObject:
    """A source node: outputs the object a test registered under ``key`` (any ComfyUI type)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("*",)
    FUNCTION = "get"
    CATEGORY = "testing"

    def get(self, key):
        return (_OBJECTS[key],)


def register(pack_nodes) -> None:
    """The pack's V3 nodes and the test source node in ``nodes.NODE_CLASS_MAPPINGS``."""
    import nodes

    for node_cls in pack_nodes:
        nodes.NODE_CLASS_MAPPINGS[node_cls.GET_SCHEMA().node_id] = node_cls
    nodes.NODE_CLASS_MAPPINGS["TDMTestObject"] = TestObject


def source(key: str, value) -> dict:
    """A TDMTestObject node (API-graph form) that outputs ``value``."""
    _OBJECTS[key] = value
    return {"class_type": "TDMTestObject", "inputs": {"key": key}}


def clear() -> None:
    """Drop the registered objects (so their models are freed before the interpreter exits)."""
    _OBJECTS.clear()


def new_executor():
    import execution

    return execution.PromptExecutor(MessageLog(), cache_type=execution.CacheType.CLASSIC, cache_args={"lru": 0, "ram": 0})


def run(executor, graph: dict, outputs: list[str]) -> list[tuple[str, dict]]:
    """Queue ``graph`` once (as the server's prompt worker does) and return the executor's status messages."""
    executor.execute(graph, f"test-{next(_PROMPT_IDS)}", {}, outputs)
    return executor.status_messages


def cached_output(executor, node_id: str):
    """The node's outputs as the executor cached them (lists, one entry per output)."""
    entry = executor.caches.outputs.get(node_id)
    return None if entry is None else entry.outputs
