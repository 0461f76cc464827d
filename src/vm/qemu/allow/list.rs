//! What a destination allows in a peer's launch spec: the options, for each
//! its properties and their values, the kinds of objects, devices, network
//! and block backends and chardevs. Only data: the checks are in the parent.

/// What a property's value may be.
#[derive(Clone, Copy)]
pub(super) enum V {
    /// A QEMU id: a letter, then letters, digits, `-`, `_`, `.`.
    Id,
    /// A decimal number.
    Num,
    /// A size: a number with an optional k/M/G/T suffix.
    Size,
    /// on/off and QEMU's other spellings.
    Bool,
    /// Letters, digits and `_ . : + - @`: names, models, lists like `0-3`.
    Word,
    /// Printable text without commas' special meaning (already split).
    Text,
    /// A file confined to the VM's directory or a storage prefix.
    File,
    /// One of these.
    OneOf(&'static [&'static str]),
    /// A block node: a node-name, or an inline node checked as `-blockdev`.
    Node,
    /// Either one of these words or a cache object (`cache.direct=on`).
    Cache,
}

/// Properties allowed for one option or kind; `implied` is the key QEMU
/// gives a first item without `=` (`-smp 2` is `cpus=2`).
pub(super) struct Schema {
    pub(super) implied: Option<&'static str>,
    pub(super) keys: &'static [(&'static str, V)],
}

pub(super) const BOOLS: &[&str] = &["on", "off", "true", "false", "yes", "no", "auto"];
pub(super) const CACHE_MODES: &[&str] = &["none", "writeback", "writethrough", "directsync", "unsafe"];

pub(super) const MACHINE: Schema = Schema {
    implied: Some("type"),
    keys: &[
        ("type", V::Word),
        ("accel", V::OneOf(&["kvm", "tcg", "kvm:tcg"])),
        ("memory-backend", V::Id),
        ("usb", V::Bool),
        ("vmport", V::Bool),
        ("smm", V::Bool),
        ("dump-guest-core", V::Bool),
        ("mem-merge", V::Bool),
        ("kernel-irqchip", V::OneOf(&["on", "off", "split"])),
        ("graphics", V::Bool),
        ("pic", V::Bool),
        ("pit", V::Bool),
        ("hpet", V::Bool),
        ("sata", V::Bool),
        ("i8042", V::Bool),
        ("acpi", V::Bool),
        ("nvdimm", V::Bool),
        ("hmat", V::Bool),
        ("suppress-vmdesc", V::Bool),
        ("max-ram-below-4g", V::Size),
    ],
};
pub(super) const ACCEL: Schema = Schema {
    implied: Some("accel"),
    keys: &[
        ("accel", V::OneOf(&["kvm", "tcg"])),
        ("thread", V::OneOf(&["single", "multi"])),
        ("tb-size", V::Num),
        ("kernel-irqchip", V::OneOf(&["on", "off", "split"])),
    ],
};
pub(super) const SMP: Schema = Schema {
    implied: Some("cpus"),
    keys: &[
        ("cpus", V::Num),
        ("maxcpus", V::Num),
        ("sockets", V::Num),
        ("dies", V::Num),
        ("clusters", V::Num),
        ("cores", V::Num),
        ("threads", V::Num),
        ("books", V::Num),
        ("drawers", V::Num),
    ],
};
pub(super) const MEM: Schema =
    Schema { implied: Some("size"), keys: &[("size", V::Size), ("slots", V::Num), ("maxmem", V::Size)] };
pub(super) const NUMA: Schema = Schema {
    implied: Some("type"),
    keys: &[
        ("type", V::OneOf(&["node", "dist", "cpu"])),
        ("nodeid", V::Num),
        ("memdev", V::Id),
        ("cpus", V::Word),
        ("initiator", V::Num),
        ("src", V::Num),
        ("dst", V::Num),
        ("val", V::Num),
        ("node-id", V::Num),
        ("socket-id", V::Num),
        ("core-id", V::Num),
        ("thread-id", V::Num),
    ],
};
pub(super) const NAME: Schema =
    Schema { implied: Some("guest"), keys: &[("guest", V::Text), ("process", V::Word), ("debug-threads", V::Bool)] };
pub(super) const BOOT: Schema = Schema {
    implied: Some("order"),
    keys: &[
        ("order", V::Word),
        ("once", V::Word),
        ("menu", V::Bool),
        ("splash-time", V::Num),
        ("reboot-timeout", V::Num),
        ("strict", V::Bool),
    ],
};
pub(super) const RTC: Schema = Schema {
    implied: None,
    keys: &[("base", V::Word), ("clock", V::OneOf(&["host", "rt", "vm"])), ("driftfix", V::OneOf(&["none", "slew"]))],
};
pub(super) const OVERCOMMIT: Schema =
    Schema { implied: None, keys: &[("mem-lock", V::OneOf(&["on", "off", "on-fault"])), ("cpu-pm", V::Bool)] };
pub(super) const MSG: Schema = Schema { implied: None, keys: &[("timestamp", V::Bool), ("guest-name", V::Bool)] };
pub(super) const ACTION: Schema = Schema {
    implied: None,
    keys: &[("reboot", V::Word), ("shutdown", V::Word), ("panic", V::Word), ("watchdog", V::Word)],
};
pub(super) const DISPLAY: Schema = Schema { implied: Some("type"), keys: &[("type", V::OneOf(&["none"]))] };
pub(super) const SMBIOS: Schema = Schema {
    implied: None,
    keys: &[
        ("type", V::Num),
        ("vendor", V::Text),
        ("version", V::Text),
        ("date", V::Text),
        ("release", V::Word),
        ("uefi", V::Bool),
        ("manufacturer", V::Text),
        ("product", V::Text),
        ("serial", V::Text),
        ("uuid", V::Word),
        ("sku", V::Text),
        ("family", V::Text),
        ("asset", V::Text),
        ("location", V::Text),
        ("part", V::Text),
        ("speed", V::Num),
        ("sock_pfx", V::Text),
    ],
};
pub(super) const FW_CFG: Schema = Schema { implied: None, keys: &[("name", V::Text), ("string", V::Text)] };
pub(super) const DRIVE: Schema = Schema {
    implied: None,
    keys: &[
        ("file", V::File),
        ("format", V::OneOf(&["raw", "qcow2"])),
        ("if", V::OneOf(&["none", "virtio", "ide", "scsi"])),
        ("id", V::Id),
        ("node-name", V::Id),
        ("index", V::Num),
        ("bus", V::Num),
        ("unit", V::Num),
        ("media", V::OneOf(&["disk", "cdrom"])),
        ("cache", V::Cache),
        ("aio", V::OneOf(&["threads", "native", "io_uring"])),
        ("readonly", V::Bool),
        ("read-only", V::Bool),
        ("discard", V::OneOf(&["ignore", "off", "unmap", "on"])),
        ("detect-zeroes", V::OneOf(&["on", "off", "unmap"])),
        ("werror", V::Word),
        ("rerror", V::Word),
        ("serial", V::Word),
        ("copy-on-read", V::Bool),
    ],
};
pub(super) const CACHE: Schema = Schema { implied: None, keys: &[("direct", V::Bool), ("no-flush", V::Bool)] };

/// `-object` kinds. Memory backends are rewritten onto the agent's files
/// (their `mem-path` and preallocation are replaced, see `destination_args`).
pub(super) const OBJECTS: &[(&str, Schema)] = &[
    ("memory-backend-file", MEMORY_BACKEND),
    ("memory-backend-memfd", MEMORY_BACKEND),
    ("memory-backend-ram", MEMORY_BACKEND),
    (
        "iothread",
        Schema {
            implied: None,
            keys: &[
                ("id", V::Id),
                ("poll-max-ns", V::Num),
                ("poll-grow", V::Num),
                ("poll-shrink", V::Num),
                ("aio-max-batch", V::Num),
            ],
        },
    ),
    ("rng-builtin", Schema { implied: None, keys: &[("id", V::Id)] }),
    (
        "rng-random",
        Schema { implied: None, keys: &[("id", V::Id), ("filename", V::OneOf(&["/dev/urandom", "/dev/random"]))] },
    ),
];
pub(super) const MEMORY_BACKEND: Schema = Schema {
    implied: None,
    keys: &[
        ("id", V::Id),
        ("size", V::Size),
        ("share", V::Bool),
        ("merge", V::Bool),
        ("dump", V::Bool),
        ("policy", V::OneOf(&["default", "preferred", "bind", "interleave"])),
        ("host-nodes", V::Word),
        ("prealloc", V::Bool),
        ("prealloc-threads", V::Num),
        ("reserve", V::Bool),
        ("align", V::Size),
        ("discard-data", V::Bool),
        ("x-use-canonical-path-for-ramblock-id", V::Bool),
        // Replaced by the agent's file: never opened as given.
        ("mem-path", V::Text),
        ("hugetlb", V::Bool),
        ("hugetlbsize", V::Size),
        ("seal", V::Bool),
    ],
};

/// `-netdev` (and `-nic`) kinds: user networking and tap devices without
/// helpers; no sockets, no inherited file descriptors.
pub(super) const NETDEVS: &[(&str, Schema)] = &[
    (
        "user",
        Schema {
            implied: None,
            keys: &[
                ("id", V::Id),
                ("net", V::Word),
                ("host", V::Word),
                ("restrict", V::Bool),
                ("ipv4", V::Bool),
                ("ipv6", V::Bool),
                ("ipv6-net", V::Word),
                ("hostname", V::Word),
                ("domainname", V::Word),
                ("dns", V::Word),
                ("dhcpstart", V::Word),
                ("hostfwd", V::Word),
                ("model", V::Word),
                ("mac", V::Word),
            ],
        },
    ),
    (
        "tap",
        Schema {
            implied: None,
            keys: &[
                ("id", V::Id),
                ("ifname", V::Word),
                ("script", V::OneOf(&["no"])),
                ("downscript", V::OneOf(&["no"])),
                ("vhost", V::Bool),
                ("queues", V::Num),
                ("vnet_hdr", V::Bool),
                ("sndbuf", V::Size),
                ("poll-us", V::Num),
                ("model", V::Word),
                ("mac", V::Word),
            ],
        },
    ),
    ("none", Schema { implied: None, keys: &[] }),
];

/// `-chardev` backends: nothing that listens or connects on the network.
pub(super) const CHARDEVS: &[(&str, Schema)] = &[
    ("null", Schema { implied: None, keys: &[("id", V::Id)] }),
    ("ringbuf", Schema { implied: None, keys: &[("id", V::Id), ("size", V::Size)] }),
    (
        "file",
        Schema {
            implied: None,
            keys: &[
                ("id", V::Id),
                ("path", V::File),
                ("append", V::Bool),
                ("logfile", V::File),
                ("logappend", V::Bool),
            ],
        },
    ),
    (
        "socket",
        Schema {
            implied: None,
            keys: &[
                ("id", V::Id),
                ("path", V::File),
                ("server", V::Bool),
                ("wait", V::Bool),
                ("reconnect", V::Num),
                ("logfile", V::File),
                ("logappend", V::Bool),
            ],
        },
    ),
    ("stdio", Schema { implied: None, keys: &[("id", V::Id), ("signal", V::Bool), ("mux", V::Bool)] }),
];

/// `-blockdev` drivers: local files and the formats on top of them.
pub(super) const BLOCKDEVS: &[(&str, Schema)] = &[
    (
        "file",
        Schema {
            implied: None,
            keys: &[
                ("node-name", V::Id),
                ("filename", V::File),
                ("aio", V::OneOf(&["threads", "native", "io_uring"])),
                ("locking", V::Bool),
                ("discard", V::OneOf(&["ignore", "unmap"])),
                ("read-only", V::Bool),
                ("auto-read-only", V::Bool),
                ("force-share", V::Bool),
                ("cache", V::Cache),
                ("detect-zeroes", V::OneOf(&["on", "off", "unmap"])),
            ],
        },
    ),
    ("raw", FORMAT),
    ("qcow2", FORMAT),
    ("null-co", Schema { implied: None, keys: &[("node-name", V::Id), ("size", V::Size), ("read-zeroes", V::Bool)] }),
];
pub(super) const FORMAT: Schema = Schema {
    implied: None,
    keys: &[
        ("node-name", V::Id),
        ("file", V::Node),
        ("backing", V::Node),
        ("read-only", V::Bool),
        ("auto-read-only", V::Bool),
        ("discard", V::OneOf(&["ignore", "unmap"])),
        ("cache", V::Cache),
        ("detect-zeroes", V::OneOf(&["on", "off", "unmap"])),
        ("offset", V::Num),
        ("size", V::Size),
    ],
};

/// `-device` drivers: common virtio, storage, network, serial, USB, PCI
/// topology and display devices. Their properties are ids, numbers and
/// words; the only one that names a host file, `romfile`, is refused.
pub(super) const DEVICES: &[&str] = &[
    "virtio-net-pci",
    "virtio-blk-pci",
    "virtio-scsi-pci",
    "virtio-serial-pci",
    "virtio-rng-pci",
    "virtio-balloon-pci",
    "virtio-gpu-pci",
    "virtio-keyboard-pci",
    "virtio-mouse-pci",
    "virtio-tablet-pci",
    "virtconsole",
    "virtserialport",
    "scsi-hd",
    "scsi-cd",
    "ide-hd",
    "ide-cd",
    "nvme",
    "e1000",
    "e1000e",
    "rtl8139",
    "isa-serial",
    "pci-serial",
    "usb-tablet",
    "usb-kbd",
    "usb-mouse",
    "qemu-xhci",
    "nec-usb-xhci",
    "piix3-usb-uhci",
    "pcie-root-port",
    "pci-bridge",
    "VGA",
    "bochs-display",
    "cirrus-vga",
    "i6300esb",
    "ib700",
    "pvpanic",
    "vmcoreinfo",
    "virtio-iommu-pci",
];
/// Drivers `-global` may set properties of, besides [`DEVICES`].
pub(super) const GLOBAL_DRIVERS: &[&str] =
    &["kvm-pit", "ICH9-LPC", "PIIX4_PM", "isa-fdc", "mch", "q35-pcihost", "i440FX-pcihost"];

/// How an option's value is read.
pub(super) enum Opt {
    /// No value.
    Flag,
    /// QEMU's key=value syntax (or JSON) against one schema.
    Keyval(&'static Schema),
    /// Key=value or JSON whose first item (or `kind_key`) selects the schema.
    Kinds { kind_key: &'static str, kinds: &'static [(&'static str, Schema)] },
    /// One value, checked as a whole.
    Value(V),
    /// `-device`: an allow-listed driver with id/number/word properties.
    Device,
    /// `-global driver.property=value`.
    Global,
    /// `-cpu model,+flag,-flag,key=value`.
    Cpu,
    /// `-serial`/`-parallel`: none, null, stdio, `file:PATH`, `chardev:ID`.
    Serial,
    /// `-bios`: a name in QEMU's data directory or a confined path.
    Bios,
}

/// The allow-list. Options the agent sets itself are taken out before
/// (`-qmp`, `-incoming`, `-S`, `-sandbox`, ...: see `strip_control`).
pub(super) const OPTIONS: &[(&str, Opt)] = &[
    ("nodefaults", Opt::Flag),
    ("no-user-config", Opt::Flag),
    ("nographic", Opt::Flag),
    ("no-reboot", Opt::Flag),
    ("no-shutdown", Opt::Flag),
    ("enable-kvm", Opt::Flag),
    ("no-hpet", Opt::Flag),
    ("usb", Opt::Flag),
    ("machine", Opt::Keyval(&MACHINE)),
    ("M", Opt::Keyval(&MACHINE)),
    ("accel", Opt::Keyval(&ACCEL)),
    ("cpu", Opt::Cpu),
    ("smp", Opt::Keyval(&SMP)),
    ("m", Opt::Keyval(&MEM)),
    ("numa", Opt::Keyval(&NUMA)),
    ("name", Opt::Keyval(&NAME)),
    ("uuid", Opt::Value(V::Word)),
    ("boot", Opt::Keyval(&BOOT)),
    ("rtc", Opt::Keyval(&RTC)),
    ("overcommit", Opt::Keyval(&OVERCOMMIT)),
    ("msg", Opt::Keyval(&MSG)),
    ("action", Opt::Keyval(&ACTION)),
    ("watchdog-action", Opt::Value(V::Word)),
    ("display", Opt::Keyval(&DISPLAY)),
    ("vga", Opt::Value(V::OneOf(&["none", "std", "virtio", "cirrus", "qxl"]))),
    ("vnc", Opt::Value(V::OneOf(&["none"]))),
    ("smbios", Opt::Keyval(&SMBIOS)),
    ("fw_cfg", Opt::Keyval(&FW_CFG)),
    ("object", Opt::Kinds { kind_key: "qom-type", kinds: OBJECTS }),
    ("netdev", Opt::Kinds { kind_key: "type", kinds: NETDEVS }),
    ("nic", Opt::Kinds { kind_key: "type", kinds: NETDEVS }),
    ("net", Opt::Value(V::OneOf(&["none"]))),
    ("chardev", Opt::Kinds { kind_key: "backend", kinds: CHARDEVS }),
    ("blockdev", Opt::Kinds { kind_key: "driver", kinds: BLOCKDEVS }),
    ("drive", Opt::Keyval(&DRIVE)),
    ("device", Opt::Device),
    ("global", Opt::Global),
    ("serial", Opt::Serial),
    ("parallel", Opt::Serial),
    ("kernel", Opt::Value(V::File)),
    ("initrd", Opt::Value(V::File)),
    ("dtb", Opt::Value(V::File)),
    ("bios", Opt::Bios),
    ("append", Opt::Value(V::Text)),
    ("k", Opt::Value(V::Word)),
    ("d", Opt::Value(V::Word)),
    ("D", Opt::Value(V::File)),
];

/// Longest value of a text property: a kernel command line fits.
pub(super) const MAX_TEXT: usize = 4096;
