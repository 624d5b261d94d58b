//! The bounded channel body: a send racing the body being dropped (the client leaving) must
//! either queue the data or hand it back, never lose it or hand back something else.

use bytes::Bytes;
use loom::thread;

use crate::channel::{channel_body, TrySendError};

#[test]
fn loom_try_send_racing_a_dropped_body_hands_the_data_back() {
    loom::model(|| {
        let (mut tx, body) = channel_body(16);
        let client = thread::spawn(move || drop(body));
        let data = Bytes::from_static(b"hello");
        match tx.try_send(data.clone()) {
            Ok(()) => {}
            Err(TrySendError::Closed(back)) => assert_eq!(back, data, "the data is handed back"),
            Err(TrySendError::Full(_)) => panic!("the buffer is below its high-water mark"),
        }
        client.join().unwrap();
        assert!(tx.is_closed());
    });
}
