"""An independent QUIC client (aioquic) against quicpush: resume negotiation,
the 32-byte header extension, AuthReply JSON, replay after reconnect."""
import asyncio, json, struct, subprocess, sys, ssl
from aioquic.asyncio import connect
from aioquic.quic.configuration import QuicConfiguration

ADDR, PORT, CA, Q, TOKEN_KEY = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], "py-k"

def frame(op, seq, body):
    return struct.pack(">IHHII", 16 + len(body), 16, 1, op, seq) + body

async def read_frames(reader, n):
    out = []
    while len(out) < n:
        hdr = await reader.readexactly(16)
        pack, hlen, ver, op, seq = struct.unpack(">IHHII", hdr)
        rest = await reader.readexactly(pack - 16)
        ext = rest[: hlen - 16]
        body = rest[hlen - 16 :]
        meta = None
        if hlen == 32:
            src, epoch, offset = ext[0], struct.unpack(">I", ext[4:8])[0], struct.unpack(">Q", ext[8:16])[0]
            meta = (src, epoch, offset)
        out.append((op, seq, body, meta))
    return out

async def session(resume):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["quicpush/1"])
    cfg.load_verify_locations(CA)
    cfg.server_name = "localhost"
    ctx = connect(ADDR, PORT, configuration=cfg)
    conn = await ctx.__aenter__()
    reader, writer = await conn.create_stream()
    tok = {"key": TOKEN_KEY, "resume": resume}
    writer.write(frame(7, 1, json.dumps(tok).encode()))
    [(op, seq, body, meta)] = await read_frames(reader, 1)
    assert op == 8 and seq == 1, (op, seq)
    return ctx, reader, writer, json.loads(body)

def push(body):
    subprocess.run([Q, "push", "--key", TOKEN_KEY, "--op", "1000", "--body", body], check=True, capture_output=True)

async def main():
    conn, reader, writer, reply = await session({})
    assert reply["key"] == TOKEN_KEY and "key" in reply["sources"], reply
    push("a1")
    [(op, seq, body, meta)] = await read_frames(reader, 1)
    assert (op, seq, body) == (1000, 1, b"a1") and meta[0] == 1 and meta[2] == 1, (op, seq, body, meta)
    pos = {"key": {"epoch": meta[1], "offset": meta[2]}}
    await conn.__aexit__(None, None, None)
    await asyncio.sleep(0.5)
    push("a2"); push("a3")
    conn, reader, writer, reply = await session({"key": TOKEN_KEY, "positions": pos})
    assert reply["sources"]["key"]["recovered"] is True and reply["sources"]["key"]["offset"] == 3, reply
    got = await read_frames(reader, 2)
    assert [(g[2], g[3][2]) for g in got] == [(b"a2", 2), (b"a3", 3)], got
    await conn.__aexit__(None, None, None)
    print("aioquic: resume negotiated, extension decoded, replay", [g[2].decode() for g in got], "recovered")

asyncio.run(main())
