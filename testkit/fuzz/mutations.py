"""Byte- and frame-level mutations of valid encodings, shared by the codec fuzz tests and the
socket fuzzer. Each takes an edit drawn by the caller: (op, pos, arg)."""
from __future__ import annotations


def edit_header(head: bytearray, op, pos, arg):
    if not head and op != "insert":
        return head
    i = pos % max(len(head), 1)
    if op == "flip":
        head[i] ^= arg
    elif op == "set":
        head[i] = arg
    elif op == "insert":
        head[i:i] = arg
    elif op == "delete":
        del head[i:i + arg]
    elif op == "truncate":
        del head[i:]
    return head


def edit_frames(frames: list, op, pos, arg):
    if op == "append":
        frames.append(arg)
        return frames
    if len(frames) < 2:
        return frames
    i = 1 + (pos - 1) % (len(frames) - 1)
    if op == "drop":
        del frames[i]
    elif op == "duplicate":
        frames.insert(i, frames[i])
    elif op == "resize":
        frames[i] = frames[i][:max(len(frames[i]) + arg, 0)] + b"\x00" * max(arg, 0)
    elif op == "swap":
        j = 1 + (arg - 1) % (len(frames) - 1)
        frames[i], frames[j] = frames[j], frames[i]
    return frames
