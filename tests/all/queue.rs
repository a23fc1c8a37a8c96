//! The embedded queue through its trait, without workers: leases that
//! expire are offered again, and the late holder's report is refused.

use kwq::model::{ModuleId, NewTask, TaskOptions, TaskState};
use kwq::queue::embedded::{EmbeddedConfig, EmbeddedQueue};
use kwq::queue::{Completion, QueueError, ReadStore, WorkQueue, WorkerView};
use std::time::Duration;

fn view(id: &str) -> WorkerView {
    WorkerView {
        id: id.into(),
        warm: Vec::new(),
        pool: None,
    }
}

#[tokio::test]
async fn an_expired_lease_is_offered_again_and_the_stale_holder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        lease_ttl: Duration::from_millis(100),
        ..EmbeddedConfig::default()
    };
    let queue = EmbeddedQueue::open(&dir.path().join("q.db"), config).unwrap();
    let task = NewTask {
        id: "t-lease".into(),
        job_id: None,
        module: ModuleId::of(b"m"),
        payload: b"{}".to_vec(),
        options: TaskOptions::default(),
    };
    queue.submit_tasks(vec![task]).await.unwrap();

    let first = queue.lease(&view("w1")).await.unwrap();
    assert_eq!((first.task_id.as_str(), first.attempt), ("t-lease", 1));
    queue.started(&first);
    // w1 goes silent; w2's lease call returns once w1's lease has expired.
    let second = tokio::time::timeout(Duration::from_secs(10), queue.lease(&view("w2")))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((second.task_id.as_str(), second.attempt), ("t-lease", 2));

    let late = queue.complete(&first, Completion::default());
    assert_eq!(late.unwrap_err(), QueueError::StaleLease("t-lease".into()));
    assert!(queue.heartbeat(&first).is_err());
    queue
        .complete(
            &second,
            Completion {
                result: b"42".to_vec(),
                ..Completion::default()
            },
        )
        .unwrap();
    queue.flush().await.unwrap();

    let record = queue.task(&"t-lease".to_string()).await.unwrap();
    assert_eq!(
        (record.state, record.result.as_deref()),
        (TaskState::Completed, Some(&b"42"[..]))
    );
    let timeline: Vec<(TaskState, Option<String>)> = queue
        .timeline(&"t-lease".to_string())
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.state, e.worker))
        .collect();
    assert_eq!(
        timeline,
        vec![
            (TaskState::Pending, None),
            (TaskState::Allocated, Some("w1".into())),
            (TaskState::Running, Some("w1".into())),
            (TaskState::Pending, None),
            (TaskState::Allocated, Some("w2".into())),
            (TaskState::Completed, Some("w2".into())),
        ]
    );
}

#[tokio::test]
async fn a_closed_queue_wakes_waiting_workers_with_none() {
    let dir = tempfile::tempdir().unwrap();
    let queue = EmbeddedQueue::open(&dir.path().join("q.db"), EmbeddedConfig::default()).unwrap();
    let waiting = {
        let queue = queue.clone();
        tokio::spawn(async move { queue.lease(&view("w")).await.is_none() })
    };
    tokio::task::yield_now().await;
    queue.close();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .unwrap()
            .unwrap()
    );
}

/// A lease is plain data: one sent over the wire and read back (as a
/// worker on another machine would hold it) heartbeats and completes the
/// task, and a copy with a forged token is refused.
#[tokio::test]
async fn a_lease_read_back_from_json_still_names_its_task_and_token() {
    let dir = tempfile::tempdir().unwrap();
    let queue = EmbeddedQueue::open(&dir.path().join("q.db"), EmbeddedConfig::default()).unwrap();
    let task = NewTask {
        id: "t-wire".into(),
        job_id: None,
        module: ModuleId::of(b"m"),
        payload: b"{\"x\":1}".to_vec(),
        options: TaskOptions::default(),
    };
    queue.submit_tasks(vec![task]).await.unwrap();
    let lease = queue.lease(&view("remote")).await.unwrap();
    let wire = serde_json::to_string(&lease).unwrap();
    let held: kwq::queue::Lease = serde_json::from_str(&wire).unwrap();
    assert_eq!(&*held.payload, b"{\"x\":1}");
    let mut forged = held.clone();
    forged.token += 1;
    assert_eq!(
        queue.heartbeat(&forged).unwrap_err(),
        QueueError::StaleLease("t-wire".into())
    );
    queue.started(&held);
    queue.heartbeat(&held).unwrap();
    queue
        .complete(
            &held,
            Completion {
                result: b"7".to_vec(),
                ..Completion::default()
            },
        )
        .unwrap();
    queue.flush().await.unwrap();
    let record = queue.task(&"t-wire".to_string()).await.unwrap();
    assert_eq!(record.state, TaskState::Completed);
    assert_eq!(record.result.as_deref(), Some(&b"7"[..]));
}

/// A short attempt's Allocated, Running and outcome are stored in one
/// commit, the row updated once: it must end as the updates one by one
/// would leave it, whatever ends the attempt.
#[tokio::test]
async fn a_short_attempt_stored_in_one_commit_keeps_every_column() {
    use kwq::model::{ErrorKind, now_ms};
    use kwq::queue::Failure;
    let dir = tempfile::tempdir().unwrap();
    let queue = EmbeddedQueue::open(&dir.path().join("q.db"), EmbeddedConfig::default()).unwrap();
    let id = "t-fold".to_string();
    queue
        .submit_tasks(vec![NewTask {
            id: id.clone(),
            job_id: None,
            module: ModuleId::of(b"m"),
            payload: b"{}".to_vec(),
            options: TaskOptions::default(),
        }])
        .await
        .unwrap();
    let record = || async { queue.task(&id).await.unwrap() };

    // A failure to retry: Error, by w1, every state's time recorded.
    let first = queue.lease(&view("w1")).await.unwrap();
    queue.started(&first);
    let failure = Failure {
        kind: ErrorKind::Trap,
        message: "boom".into(),
        logs: Vec::new(),
        run_us: 5,
        retry_at: Some(now_ms()),
    };
    queue.fail(&first, failure).unwrap();
    queue.flush().await.unwrap();
    let after_failure = record().await;
    assert_eq!(after_failure.state, TaskState::Error);
    assert_eq!(after_failure.worker.as_deref(), Some("w1"));
    assert_eq!(after_failure.attempts, 1);
    assert_eq!(after_failure.error_message.as_deref(), Some("boom"));
    for state in [TaskState::Allocated, TaskState::Running, TaskState::Error] {
        assert!(after_failure.timestamps.contains_key(&state), "{state:?}");
    }

    // Given back (no worker of its own): the worker is the one that had
    // it, not the previous attempt's; the attempt does not count.
    let second = queue.lease(&view("w2")).await.unwrap();
    queue.started(&second);
    queue.release(&second, false);
    queue.flush().await.unwrap();
    let released = record().await;
    assert_eq!(released.state, TaskState::Pending);
    assert_eq!(released.worker.as_deref(), Some("w2"));
    assert_eq!(released.attempts, 1);
    assert!(
        released.timestamps[&TaskState::Allocated]
            >= after_failure.timestamps[&TaskState::Allocated]
    );

    // Completed by w3.
    let third = queue.lease(&view("w3")).await.unwrap();
    queue.started(&third);
    queue
        .complete(
            &third,
            Completion {
                result: b"7".to_vec(),
                ..Completion::default()
            },
        )
        .unwrap();
    queue.flush().await.unwrap();
    let done = record().await;
    assert_eq!(
        (
            done.state,
            done.worker.as_deref(),
            done.attempts,
            done.result.as_deref()
        ),
        (TaskState::Completed, Some("w3"), 2, Some(&b"7"[..]))
    );
    for state in [
        TaskState::Pending,
        TaskState::Allocated,
        TaskState::Running,
        TaskState::Completed,
    ] {
        assert!(done.timestamps.contains_key(&state), "{state:?}");
    }
    let timeline: Vec<TaskState> = queue
        .timeline(&id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.state)
        .collect();
    use TaskState::*;
    assert_eq!(
        timeline,
        [
            Pending, Allocated, Running, Error, Allocated, Running, Pending, Allocated, Running,
            Completed
        ]
    );
}
