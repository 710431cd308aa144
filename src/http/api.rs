//! goim-logic's routes. Parameters are in the query string (repeated for lists:
//! `keys=a&keys=b`); a push's message is the raw request body, whatever its
//! `Content-Type` (goim's benchmark programs send JSON as
//! `application/x-www-form-urlencoded` or `application/json`).
//!
//! | route | query | request | data |
//! |---|---|---|---|
//! | `POST /goim/push/keys` | `operation`, `keys`… | `MPushMsg` | outcome counts, `index`, per-key `outcomes` |
//! | `POST /goim/push/mids` | `operation`, `mids`… | `PushUser` | the tally |
//! | `POST /goim/push/room` | `operation`, `type`, `room` | `BroadcastRoom` to `type://room` | the tally, `room` |
//! | `POST /goim/push/all` | `operation`, `speed` (0) | `Broadcast` | `online` |
//! | `GET /goim/online/top` | `type`, `limit` | `Rooms` | `[{room_id, count}]`, most online first |
//! | `GET /goim/online/room` | `type`, `rooms`… | `Rooms` | `{room: count}` |
//! | `GET /goim/online/total` | — | `Online` | `ip_count`, `conn_count`, per transport |
//!
//! Unlike goim-logic, `operation` is required on every push route (goim takes 0
//! when it is missing on `keys` and `mids`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde::Serialize;

use super::{reply, ApiError, HttpState, OK, REQUEST_ERR};
use crate::channel::Transport;
use crate::metrics::{self, online_of, OUTCOMES};
use crate::rpc::proto::{Reply, Request, RpcError, Tally};

/// A query string's pairs, in order, percent-decoded.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn parse(raw: Option<&str>) -> Params {
        Params(
            form_urlencoded::parse(raw.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    /// Every value of `name`, in order.
    pub fn all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value of `name`, if any.
    pub fn first(&self, name: &str) -> Option<&str> {
        self.all(name).next()
    }

    /// The first value of `name`; missing or empty is a bad request.
    pub fn required(&self, name: &str) -> Result<&str, ApiError> {
        match self.first(name) {
            None => Err(ApiError::bad(format!("missing parameter `{name}`"))),
            Some("") => Err(ApiError::bad(format!("parameter `{name}` is empty"))),
            Some(v) => Ok(v),
        }
    }

    /// Every value of `name`, at least one, none empty.
    pub fn list(&self, name: &str) -> Result<Vec<&str>, ApiError> {
        let v: Vec<&str> = self.all(name).collect();
        if v.is_empty() {
            return Err(ApiError::bad(format!("missing parameter `{name}`")));
        }
        if v.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad(format!(
                "parameter `{name}` has an empty value"
            )));
        }
        Ok(v)
    }

    /// `operation`, required: an op number.
    pub fn operation(&self) -> Result<u32, ApiError> {
        let v = self.required("operation")?;
        v.parse().map_err(|_| {
            ApiError::bad(format!(
                "operation={v} is not an op (a number in 0..={})",
                u32::MAX
            ))
        })
    }
}

/// A number parameter with a default when it is missing.
fn number_or<T: std::str::FromStr>(
    params: &Params,
    name: &str,
    default: T,
    what: &str,
) -> Result<T, ApiError> {
    match params.first(name) {
        None | Some("") => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| ApiError::bad(format!("{name}={v} is not {what}"))),
    }
}

/// Reads the message: at most `http.max_body_bytes`, else 413.
async fn read_body(state: &HttpState, body: Body) -> Result<Bytes, ApiError> {
    match axum::body::to_bytes(body, state.max_body).await {
        Ok(b) => Ok(b),
        Err(e) => {
            let e = e.into_inner();
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(ApiError {
                        status: StatusCode::PAYLOAD_TOO_LARGE,
                        code: REQUEST_ERR,
                        message: format!(
                            "request body exceeds http.max_body_bytes of {}",
                            state.max_body
                        ),
                    });
                }
                source = s.source();
            }
            Err(ApiError::bad(format!("cannot read the request body: {e}")))
        }
    }
}

/// What a refused call answers: goim's -400 for its arguments, -500 for the
/// server's own trouble.
fn rpc_error(method: &str, e: RpcError) -> ApiError {
    match e {
        RpcError::ShuttingDown
        | RpcError::Busy(_)
        | RpcError::Internal(_)
        | RpcError::Cluster { .. } => ApiError::server(format!("{method}: {e}")),
        RpcError::EmptyKeys
        | RpcError::EmptyMids
        | RpcError::EmptyRoom
        | RpcError::BodyTooLarge { .. }
        | RpcError::TooManyKeys { .. }
        | RpcError::RequestTooLarge { .. }
        | RpcError::Malformed(_)
        | RpcError::PacedTooLong { .. } => ApiError::bad(format!("{method}: {e}")),
    }
}

async fn call(state: &HttpState, req: Request) -> Result<Reply, ApiError> {
    let method = req.method();
    state
        .dispatcher
        .dispatch(req)
        .await
        .map_err(|e| rpc_error(method, e))
}

fn ok<T: Serialize>(data: T) -> Response {
    reply(StatusCode::OK, OK, String::new(), Some(data))
}

fn unexpected(reply: &Reply) -> ApiError {
    ApiError::server(format!("unexpected reply {reply:?}"))
}

fn done(r: Result<Response, ApiError>) -> Response {
    r.unwrap_or_else(axum::response::IntoResponse::into_response)
}

#[derive(Serialize)]
struct TallyData {
    delivered: u64,
    queue_full: u64,
    filtered: u64,
    stored: u64,
    appended: u64,
    forwarded_nodes: u64,
    unavailable: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<String>,
}

impl TallyData {
    fn new(t: Tally, room: Option<String>) -> TallyData {
        TallyData {
            delivered: t.delivered,
            queue_full: t.queue_full,
            filtered: t.filtered,
            stored: t.stored,
            appended: t.appended,
            forwarded_nodes: t.forwarded_nodes,
            unavailable: t.unavailable,
            room,
        }
    }
}

/// `POST /goim/push/keys?operation=&keys=…`
pub async fn push_keys(
    State(state): State<Arc<HttpState>>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    done(
        async {
            let p = Params::parse(q.as_deref());
            let op = p.operation()?;
            let keys: Vec<String> = p.list("keys")?.into_iter().map(str::to_owned).collect();
            let body = read_body(&state, body).await?;
            let r = call(&state, Request::MPushMsg { keys, op, body }).await?;
            let Reply::Multi(m) = r else {
                return Err(unexpected(&r));
            };
            let mut counts: BTreeMap<&str, u64> = OUTCOMES.iter().map(|&o| (o, 0)).collect();
            let outcomes: Vec<&str> = m
                .outcomes
                .iter()
                .map(|&o| OUTCOMES[metrics::outcome_index(o)])
                .collect();
            for o in &outcomes {
                *counts.entry(o).or_default() += 1;
            }
            #[derive(Serialize)]
            struct Data<'a> {
                index: i64,
                #[serde(flatten)]
                counts: BTreeMap<&'a str, u64>,
                outcomes: Vec<&'a str>,
            }
            Ok(ok(Data {
                index: m.index,
                counts,
                outcomes,
            }))
        }
        .await,
    )
}

/// `POST /goim/push/mids?operation=&mids=…`
pub async fn push_mids(
    State(state): State<Arc<HttpState>>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    done(
        async {
            let p = Params::parse(q.as_deref());
            let op = p.operation()?;
            let mids = p
                .list("mids")?
                .into_iter()
                .map(|m| {
                    m.parse::<i64>().map_err(|_| {
                        ApiError::bad(format!("mids={m} is not a user id (a 64-bit integer)"))
                    })
                })
                .collect::<Result<Vec<i64>, ApiError>>()?;
            let body = read_body(&state, body).await?;
            match call(&state, Request::PushUser { mids, op, body }).await? {
                Reply::Tally(t) => Ok(ok(TallyData::new(t, None))),
                r => Err(unexpected(&r)),
            }
        }
        .await,
    )
}

/// `POST /goim/push/room?operation=&type=&room=`: to the room `type://room`.
pub async fn push_room(
    State(state): State<Arc<HttpState>>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    done(
        async {
            let p = Params::parse(q.as_deref());
            let op = p.operation()?;
            let typ = p.required("type")?;
            let room = format!("{typ}://{}", p.required("room")?);
            let body = read_body(&state, body).await?;
            let req = Request::BroadcastRoom {
                room: room.clone(),
                op,
                body,
            };
            match call(&state, req).await? {
                Reply::Tally(t) => Ok(ok(TallyData::new(t, Some(room)))),
                r => Err(unexpected(&r)),
            }
        }
        .await,
    )
}

/// `POST /goim/push/all?operation=&speed=` (speed: messages per second, 0 = no limit).
pub async fn push_all(
    State(state): State<Arc<HttpState>>,
    RawQuery(q): RawQuery,
    body: Body,
) -> Response {
    done(
        async {
            let p = Params::parse(q.as_deref());
            let op = p.operation()?;
            let speed = number_or(
                &p,
                "speed",
                0u32,
                "a speed (messages per second, 0 = no limit)",
            )?;
            let body = read_body(&state, body).await?;
            match call(&state, Request::Broadcast { op, body, speed }).await? {
                Reply::BroadcastAccepted { online } => {
                    #[derive(Serialize)]
                    struct Data {
                        online: u64,
                        speed: u32,
                    }
                    Ok(ok(Data { online, speed }))
                }
                r => Err(unexpected(&r)),
            }
        }
        .await,
    )
}

/// The rooms of `typ` with their counts, keyed by the room id after `typ://`.
async fn rooms_of(state: &HttpState, typ: &str) -> Result<Vec<(String, u64)>, ApiError> {
    let prefix = format!("{typ}://");
    match call(state, Request::Rooms).await? {
        Reply::Rooms(rooms) => Ok(rooms
            .into_iter()
            .filter_map(|r| Some((r.room.strip_prefix(&prefix)?.to_owned(), r.online)))
            .collect()),
        r => Err(unexpected(&r)),
    }
}

/// `GET /goim/online/top?type=&limit=`: the `limit` rooms of `type` with the most
/// connections, most first (ties by room id).
pub async fn online_top(State(state): State<Arc<HttpState>>, RawQuery(q): RawQuery) -> Response {
    done(
        async {
            let p = Params::parse(q.as_deref());
            let typ = p.required("type")?;
            let limit_s = p.required("limit")?;
            let limit: usize = limit_s.parse().map_err(|_| {
                ApiError::bad(format!("limit={limit_s} is not a count (a whole number)"))
            })?;
            let mut rooms = rooms_of(&state, typ).await?;
            rooms.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            rooms.truncate(limit);
            #[derive(Serialize)]
            struct Top {
                room_id: String,
                count: u64,
            }
            let top: Vec<Top> = rooms
                .into_iter()
                .map(|(room_id, count)| Top { room_id, count })
                .collect();
            Ok(ok(top))
        }
        .await,
    )
}

/// `GET /goim/online/room?type=&rooms=…`: each asked room's count (0 if empty).
pub async fn online_room(State(state): State<Arc<HttpState>>, RawQuery(q): RawQuery) -> Response {
    done(
        async {
            let p = Params::parse(q.as_deref());
            let typ = p.required("type")?;
            let asked = p.list("rooms")?;
            let have: HashMap<String, u64> = rooms_of(&state, typ).await?.into_iter().collect();
            let counts: BTreeMap<&str, u64> = asked
                .into_iter()
                .map(|r| (r, have.get(r).copied().unwrap_or(0)))
                .collect();
            Ok(ok(counts))
        }
        .await,
    )
}

/// `GET /goim/online/total`: distinct client addresses and connections online.
pub async fn online_total(State(state): State<Arc<HttpState>>) -> Response {
    done(
        async {
            match call(&state, Request::Online).await? {
                Reply::Online(o) => {
                    #[derive(Serialize)]
                    struct Data {
                        ip_count: u64,
                        conn_count: u64,
                        transports: BTreeMap<&'static str, u64>,
                    }
                    Ok(ok(Data {
                        ip_count: state.conn_limits.per_ip.distinct() as u64,
                        conn_count: o.total,
                        transports: Transport::ALL
                            .iter()
                            .map(|&t| (t.name(), online_of(&o, t)))
                            .collect(),
                    }))
                }
                r => Err(unexpected(&r)),
            }
        }
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_parameters_are_all_kept_in_order_and_decoded() {
        let p = Params::parse(Some("keys=a&keys=b%20c&operation=1000&keys=d+e"));
        assert_eq!(p.list("keys").unwrap(), vec!["a", "b c", "d e"]);
        assert_eq!(p.operation().unwrap(), 1000);
    }

    #[test]
    fn bad_parameters_name_the_parameter_and_the_value() {
        let p = Params::parse(Some("operation=-1&keys="));
        assert_eq!(
            p.operation().unwrap_err().message,
            "operation=-1 is not an op (a number in 0..=4294967295)"
        );
        assert_eq!(
            p.list("keys").unwrap_err().message,
            "parameter `keys` has an empty value"
        );
        assert_eq!(
            p.required("room").unwrap_err().message,
            "missing parameter `room`"
        );
        let p = Params::parse(None);
        assert_eq!(p.operation().unwrap_err().code, REQUEST_ERR);
    }
}
