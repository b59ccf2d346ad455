//! A topic deleted, and made anew under the same name, while a producer writes to it: the
//! producer must stop accepting records for the deleted topic with a clear error (not queue
//! them to time out two minutes later), and write to the new topic with its own partition
//! count once it exists, whether this client or another one deleted it.

mod common;

use std::time::{Duration, Instant};

use common::{read_all, Broker};
use skein_client::{Admin, ClientError, Consumer, ConsumerConfig, Producer, ProducerConfig, ProducerRecord};

/// Sends one record and waits for its acknowledgement (the send itself may fail at once).
async fn send_one(producer: &Producer, topic: &str, value: String) -> Result<u32, ClientError> {
    let delivery = producer.send(ProducerRecord::new(topic.to_owned(), value)).await?;
    Ok(delivery.await?.partition)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_topic_refuses_sends_at_once_and_its_successor_takes_them() {
    let broker = Broker::start(&[]);
    let client = broker.client().await;
    let admin = Admin::new(client.clone());
    let producer =
        Producer::new(client.clone(), ProducerConfig::default().delivery_timeout(Duration::from_secs(3)));

    // Deleted by this client: the next send fails at once, naming the topic.
    admin.create_topic("doomed", 4, &[]).await.unwrap();
    for i in 0..100 {
        send_one(&producer, "doomed", format!("{i}")).await.unwrap();
    }
    admin.delete_topic("doomed").await.unwrap();
    let error = producer.send(ProducerRecord::new("doomed", "late")).await.err().expect("refused");
    assert!(matches!(&error, ClientError::UnknownTopic(name) if name == "doomed"), "{error}");

    // Made anew with 2 partitions: the producer writes there, on its 2 partitions.
    admin.create_topic("doomed", 2, &[]).await.unwrap();
    let mut partitions = std::collections::BTreeSet::new();
    for i in 0..200 {
        partitions.insert(
            send_one(&producer, "doomed", format!("new-{i}")).await.expect("the new topic takes records"),
        );
    }
    assert!(partitions.iter().all(|p| *p < 2), "only the new topic's partitions: {partitions:?}");

    // Deleted by another client: the producer hears it from the broker (its records for the
    // topic are refused), and from then on refuses sends at once.
    let other = Admin::new(broker.client().await);
    other.delete_topic("doomed").await.unwrap();
    let started = Instant::now();
    let mut timed_out = 0;
    let refused_after = loop {
        assert!(started.elapsed() < Duration::from_secs(20), "the producer learnt that the topic is gone");
        match send_one(&producer, "doomed", "after".into()).await {
            Err(ClientError::UnknownTopic(name)) => {
                assert_eq!(name, "doomed");
                break started.elapsed();
            }
            Err(ClientError::DeliveryTimeout { last_error, .. }) => {
                assert!(last_error.contains("unknown topic"), "{last_error}");
                timed_out += 1;
            }
            other => panic!("a record for a deleted topic: {other:?}"),
        }
    };
    // And the successor made by the other client is written to, with its partition count.
    other.create_topic("doomed", 3, &[]).await.unwrap();
    let started_new = Instant::now();
    let mut written = 0u32;
    while written < 300 {
        assert!(started_new.elapsed() < Duration::from_secs(20), "the producer writes to the new topic");
        match send_one(&producer, "doomed", format!("third-{written}")).await {
            Ok(partition) => {
                assert!(partition < 3, "partition {partition} of a 3-partition topic");
                written += 1;
            }
            // Before the producer's client heard of the new topic.
            Err(ClientError::UnknownTopic(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("{error}"),
        }
    }
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign_all("doomed").await.unwrap();
    consumer.seek_all(skein_client::SeekTo::Beginning).await.unwrap();
    let records = read_all(&mut consumer, 300).await;
    assert_eq!(records.len(), 300, "the new topic holds exactly what was written to it");
    eprintln!(
        "RELIABILITY topic-lifecycle: deleted by this client, sends refused at once; deleted by another, refused {:.1} s later ({timed_out} record(s) timed out before); the successors took records at once",
        refused_after.as_secs_f64()
    );
}
