//! Why the server closes a connection: one table of close codes, kept apart
//! from errors. Reasons fit in a close frame (≤ 123 bytes).

/// A server-initiated close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disconnect {
    pub code: u16,
    pub reason: &'static str,
    /// Whether a client should reconnect (to any node).
    pub reconnect: bool,
    /// Metric label.
    pub label: &'static str,
}

impl Disconnect {
    /// SIGTERM drain: reconnect elsewhere.
    pub const SHUTDOWN: Disconnect = Disconnect {
        code: 1001,
        reason: "server shutting down",
        reconnect: true,
        label: "shutdown",
    };
    /// The outbound queue overflowed: the client could not keep up.
    pub const SLOW_CONSUMER: Disconnect = Disconnect {
        code: 4008,
        reason: "slow consumer: outbound queue full",
        reconnect: true,
        label: "slow_consumer",
    };
    /// Inbound rate limit exceeded persistently.
    pub const RATE_LIMIT: Disconnect = Disconnect {
        code: 1008,
        reason: "rate limit exceeded",
        reconnect: false,
        label: "rate_limit",
    };
    /// An inbound message over the size limit.
    pub const MESSAGE_TOO_LARGE: Disconnect = Disconnect {
        code: 1009,
        reason: "message too large",
        reconnect: false,
        label: "message_too_large",
    };
    /// The token expired while connected.
    pub const TOKEN_EXPIRED: Disconnect = Disconnect {
        code: 4401,
        reason: "token expired",
        reconnect: true,
        label: "token_expired",
    };
    /// A session (cookie) that no longer validates, or whose user or role
    /// changed: sign in again, or reconnect to pick up the new role.
    pub const SESSION_EXPIRED: Disconnect = Disconnect {
        code: 4401,
        reason: "session expired or invalid",
        reconnect: false,
        label: "session_expired",
    };
    /// No application-level PONG within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: Disconnect = Disconnect {
        code: 4000,
        reason: "no PONG within the heartbeat timeout",
        reconnect: true,
        label: "heartbeat_timeout",
    };
    /// Nothing received within the idle timeout (pongs included).
    pub const IDLE_TIMEOUT: Disconnect = Disconnect {
        code: 4000,
        reason: "no traffic within idle timeout",
        reconnect: true,
        label: "idle_timeout",
    };
    /// A frame that breaks the WebSocket protocol.
    pub const PROTOCOL_ERROR: Disconnect = Disconnect {
        code: 1002,
        reason: "protocol error",
        reconnect: false,
        label: "protocol_error",
    };
    /// Text that is not UTF-8.
    pub const INVALID_PAYLOAD: Disconnect = Disconnect {
        code: 1007,
        reason: "invalid UTF-8 in a text message",
        reconnect: false,
        label: "invalid_payload",
    };
    /// A frame of the wrong kind for the negotiated format (binary on JSON, text on protobuf).
    pub const UNSUPPORTED_DATA: Disconnect = Disconnect {
        code: 1003,
        reason: "unsupported frame type for this subprotocol",
        reconnect: false,
        label: "unsupported_data",
    };
    /// The client closed the socket (its close frame is echoed with 1000).
    pub const CLIENT_CLOSED: Disconnect = Disconnect {
        code: 1000,
        reason: "",
        reconnect: false,
        label: "client_closed",
    };
    /// The socket failed or the peer vanished: nothing is sent.
    pub const CLIENT_GONE: Disconnect = Disconnect {
        code: 1006,
        reason: "",
        reconnect: true,
        label: "client_gone",
    };
    /// A bug or an internal failure.
    pub const INTERNAL: Disconnect = Disconnect {
        code: 1011,
        reason: "internal error",
        reconnect: true,
        label: "internal",
    };
}
