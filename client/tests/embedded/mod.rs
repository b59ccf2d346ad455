//! A real broker in the test process (glommio shards, O_DIRECT files in a temporary directory
//! on a real filesystem, an ephemeral port on 127.0.0.1); stopped when dropped.

pub struct Embedded {
    pub broker: skein_broker::RunningBroker,
    _dir: tempfile::TempDir,
}

impl Embedded {
    pub fn start() -> Embedded {
        let root = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&root).unwrap();
        let dir = tempfile::tempdir_in(root).unwrap();
        let mut config =
            skein_broker::BrokerConfig::new(dir.path().join("data"), "127.0.0.1:0".parse().unwrap());
        config.cores = 2;
        let broker = skein_broker::start(config).expect("the embedded broker starts");
        Embedded { broker, _dir: dir }
    }

    pub fn addr(&self) -> String {
        self.broker.addr.to_string()
    }
}
