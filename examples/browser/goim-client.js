// A goim v2 WebSocket client for the browser (quicpush's example page and browser test). It behaves the
// way goim's own JavaScript client does: on open it sends Auth (op 7, seq 1) with a
// JSON token; after AuthReply (op 8) it sends a Heartbeat (op 2) at once and then
// every `heartbeatMs`; a HeartbeatReply (op 3) carries the room's online count; a
// Raw frame (op 9) holds complete frames from offset 16; every other op is a
// message whose body runs from headerLen to packetLen; after a close it reconnects.
//
// On top of that it checks what the test asserts: each WebSocket message is exactly
// one frame (packetLen = the message's length), and a Raw frame's inner frames tile
// its body exactly.
(function (win) {
  "use strict";
  const HEADER = 16;
  const OP = { HEARTBEAT: 2, HEARTBEAT_REPLY: 3, DISCONNECT: 6, AUTH: 7, AUTH_REPLY: 8, RAW: 9 };

  function frame(op, seq, body) {
    const bytes = body ? new TextEncoder().encode(body) : new Uint8Array(0);
    const buf = new ArrayBuffer(HEADER + bytes.byteLength);
    const view = new DataView(buf);
    view.setInt32(0, HEADER + bytes.byteLength);
    view.setInt16(4, HEADER);
    view.setInt16(6, 1);
    view.setInt32(8, op);
    view.setInt32(12, seq);
    new Uint8Array(buf, HEADER).set(bytes);
    return buf;
  }

  function header(view, at) {
    return {
      packetLen: view.getInt32(at),
      headerLen: view.getInt16(at + 4),
      ver: view.getInt16(at + 6),
      op: view.getInt32(at + 8),
      seq: view.getInt32(at + 12),
    };
  }

  class GoimClient {
    // options: url, token (a JWT, or goim's JSON token as text or an object),
    // heartbeatMs, reconnectMs, maxConnects,
    // onEvent(event) for everything that happens.
    constructor(options) {
      this.options = options;
      this.connects = 0;
      this.decoder = new TextDecoder();
      this.connect();
    }

    emit(event) {
      this.options.onEvent(event);
    }

    connect() {
      if (this.connects >= (this.options.maxConnects || 10)) return;
      this.connects += 1;
      const ws = new WebSocket(this.options.url);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.onopen = () => {
        const token = this.options.token;
        ws.send(frame(OP.AUTH, 1, typeof token === "string" ? token : JSON.stringify(token)));
        this.emit({ kind: "open", connect: this.connects });
      };
      ws.onmessage = (evt) => this.received(evt.data);
      ws.onclose = (evt) => {
        clearInterval(this.heartbeats);
        this.emit({ kind: "close", code: evt.code, connect: this.connects });
        setTimeout(() => this.connect(), this.options.reconnectMs);
      };
    }

    heartbeat() {
      this.ws.send(frame(OP.HEARTBEAT, 1));
    }

    received(data) {
      if (!(data instanceof ArrayBuffer) || data.byteLength < HEADER) {
        this.emit({ kind: "violation", why: "not a binary frame", len: data.byteLength });
        return;
      }
      const view = new DataView(data);
      const h = header(view, 0);
      if (h.packetLen !== data.byteLength) {
        this.emit({ kind: "violation", why: "message is not one frame", packetLen: h.packetLen, len: data.byteLength });
      }
      switch (h.op) {
        case OP.AUTH_REPLY:
          this.emit({ kind: "auth", connect: this.connects });
          this.heartbeat();
          this.heartbeats = setInterval(() => this.heartbeat(), this.options.heartbeatMs);
          break;
        case OP.HEARTBEAT_REPLY:
          this.emit({ kind: "heartbeat", online: h.packetLen - h.headerLen >= 4 ? view.getInt32(h.headerLen) : null });
          break;
        case OP.DISCONNECT:
          this.emit({ kind: "disconnect" });
          break;
        case OP.RAW: {
          let count = 0;
          let at = HEADER;
          while (at < data.byteLength) {
            const inner = header(view, at);
            if (inner.packetLen < inner.headerLen || at + inner.packetLen > data.byteLength) {
              this.emit({ kind: "violation", why: "Raw body is not whole frames", at });
              return;
            }
            this.message(data, at, inner, true);
            at += inner.packetLen;
            count += 1;
          }
          this.emit({ kind: "raw", frames: count });
          break;
        }
        default:
          this.message(data, 0, h, false);
      }
    }

    message(data, at, h, inRaw) {
      const body = this.decoder.decode(data.slice(at + h.headerLen, at + h.packetLen));
      this.emit({ kind: "message", op: h.op, seq: h.seq, headerLen: h.headerLen, body, inRaw });
    }
  }

  win.GoimClient = GoimClient;
})(window);
