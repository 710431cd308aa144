//! The Redis history store against a real redis-server started by the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use quicpush::history::redis_store::{Published, RedisHistory, RedisHistoryError, POSITION_LEN};
use quicpush::history::{Position, StreamRef};

use common::redis::{RedisCluster, RedisServer};

async fn connect(r: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(r.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .expect("connects to the test's redis-server")
}

#[tokio::test]
async fn appends_get_consecutive_offsets_and_every_missed_push_is_recovered() {
    let r = RedisServer::start();
    let mut con = connect(&r).await;
    let h = RedisHistory::new(100, Duration::from_secs(60));
    let s = StreamRef::Key("k1");
    let mut epoch = 0;
    for i in 1..=5u64 {
        let p = h
            .append(&mut con, s, format!("f{i}").as_bytes(), true)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(p.offset, i);
        if i > 1 {
            assert_eq!(p.epoch, epoch, "one epoch for the stream's life");
        }
        epoch = p.epoch;
    }
    let all = h
        .since(&mut con, s, Position { epoch, offset: 0 })
        .await
        .unwrap();
    assert!(all.recovered);
    assert_eq!(all.top, Position { epoch, offset: 5 });
    let got: Vec<(u64, String)> = all
        .entries
        .iter()
        .map(|(o, f)| (*o, String::from_utf8(f.to_vec()).unwrap()))
        .collect();
    assert_eq!(
        got,
        (1..=5).map(|i| (i, format!("f{i}"))).collect::<Vec<_>>()
    );
    let tail = h
        .since(&mut con, s, Position { epoch, offset: 3 })
        .await
        .unwrap();
    assert!(tail.recovered);
    assert_eq!(
        tail.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![4, 5]
    );
    let none = h
        .since(&mut con, s, Position { epoch, offset: 5 })
        .await
        .unwrap();
    assert!(none.recovered && none.entries.is_empty());
}

#[tokio::test]
async fn a_wrong_epoch_a_position_ahead_or_a_trimmed_gap_is_not_recovered() {
    let r = RedisServer::start();
    let mut con = connect(&r).await;
    let h = RedisHistory::new(3, Duration::from_secs(60));
    let s = StreamRef::Room("live://1");
    let mut epoch = 0;
    for i in 1..=5u64 {
        epoch = h
            .append(&mut con, s, &[i as u8], true)
            .await
            .unwrap()
            .unwrap()
            .epoch;
    }
    let other = epoch.wrapping_add(1).max(1);
    let wrong = h
        .since(
            &mut con,
            s,
            Position {
                epoch: other,
                offset: 2,
            },
        )
        .await
        .unwrap();
    assert!(!wrong.recovered && wrong.entries.is_empty());
    assert_eq!(wrong.top, Position { epoch, offset: 5 });
    let ahead = h
        .since(&mut con, s, Position { epoch, offset: 9 })
        .await
        .unwrap();
    assert!(!ahead.recovered && ahead.entries.is_empty());
    // Size 3 keeps 3..=5: a client at 1 missed 2, which is gone.
    let gap = h
        .since(&mut con, s, Position { epoch, offset: 1 })
        .await
        .unwrap();
    assert!(!gap.recovered && gap.entries.is_empty(), "{gap:?}");
    let kept = h
        .since(&mut con, s, Position { epoch, offset: 2 })
        .await
        .unwrap();
    assert!(kept.recovered);
    assert_eq!(
        kept.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
}

#[tokio::test]
async fn a_missing_stream_is_not_created_unless_asked_and_expires_with_its_ttl() {
    let r = RedisServer::start();
    let mut con = connect(&r).await;
    let h = RedisHistory::new(10, Duration::from_secs(1));
    let s = StreamRef::User(42);
    assert_eq!(h.append(&mut con, s, b"x", false).await.unwrap(), None);
    let p = h.append(&mut con, s, b"x", true).await.unwrap().unwrap();
    assert_eq!(p.offset, 1);
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    // Expired: a new stream with a new epoch, and the old position is not recovered.
    let after = h.since(&mut con, s, p).await.unwrap();
    assert!(!after.recovered);
    assert_ne!(after.top.epoch, p.epoch);
    assert_eq!(after.top.offset, 0);
}

#[tokio::test]
async fn append_and_publish_is_one_order_for_history_and_subscribers() {
    let r = RedisServer::start();
    let mut con = connect(&r).await;
    let client = redis::Client::open(r.url()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe("quicpush:node:n1").await.unwrap();
    let h = RedisHistory::new(100, Duration::from_secs(60));
    let s = StreamRef::Key("k9");
    let mut sent = Vec::new();
    for i in 0..20u32 {
        let frame = i.to_be_bytes();
        let done = h
            .append_publish(&mut con, s, &frame, "quicpush:node:n1", b"PX")
            .await
            .unwrap();
        assert_eq!(done.receivers, 1);
        sent.push((done.position, frame.to_vec()));
    }
    let mut msgs = sub.on_message();
    for (pos, frame) in &sent {
        let m = tokio::time::timeout(Duration::from_secs(5), msgs.next())
            .await
            .expect("published message arrives")
            .unwrap();
        let payload: Vec<u8> = m.get_payload_bytes().to_vec();
        assert_eq!(&payload[..2], b"PX");
        assert_eq!(payload.len(), 2 + POSITION_LEN + frame.len());
        let p = Published::parse(&payload[2..]).unwrap();
        assert_eq!(p.position, *pos);
        assert_eq!(&p.frame[..], &frame[..]);
    }
    let rec = h
        .since(
            &mut con,
            s,
            Position {
                epoch: sent[0].0.epoch,
                offset: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(rec.entries.len(), 20);
}

#[tokio::test]
async fn redis_gone_is_a_typed_error_naming_the_stream() {
    let r = RedisServer::start();
    let mut con = connect(&r).await;
    drop(r);
    let h = RedisHistory::new(10, Duration::from_secs(60));
    let err = h
        .append(&mut con, StreamRef::Key("gone"), b"x", true)
        .await
        .expect_err("no redis-server");
    assert!(
        matches!(err, RedisHistoryError::Redis { op: "append", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("quicpush:{k:gone}:meta"), "{err}");
}

#[tokio::test]
async fn on_a_three_master_redis_cluster_every_script_stays_in_one_slot() {
    let cluster = RedisCluster::start();
    let client = redis::cluster::ClusterClient::new(cluster.urls()).unwrap();
    let mut con = client
        .get_async_connection()
        .await
        .expect("cluster connection");
    let h = RedisHistory::new(50, Duration::from_secs(60));
    // Streams spread over the three masters' slots.
    for i in 0..30 {
        let key = format!("user-{i}");
        let s = StreamRef::Key(&key);
        let mut epoch = 0;
        for n in 1..=3u64 {
            let p = h
                .append(&mut con, s, &[n as u8], true)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(p.offset, n);
            epoch = p.epoch;
        }
        let rec = h
            .since(&mut con, s, Position { epoch, offset: 1 })
            .await
            .unwrap();
        assert!(rec.recovered, "{key}");
        assert_eq!(
            rec.entries.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
    }
    let masters_used = cluster
        .nodes()
        .iter()
        .filter(|n| n.cli(&["DBSIZE"]).trim().parse::<u64>().expect("DBSIZE") > 0)
        .count();
    assert_eq!(masters_used, 3, "30 streams land on every master");
}
