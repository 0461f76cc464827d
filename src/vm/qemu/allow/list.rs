//! What a destination allows in a peer's launch spec: the options, for each
//! its properties and their values, the kinds of objects, devices, network
//! and block backends and chardevs. Only data: the checks are in the parent.

/// What a property's value may be.
#[derive(Clone, Copy)]
pub(in crate::vm::qemu) enum V {
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
}

/// Properties allowed for one option or kind; `implied` is the key QEMU
/// gives a first item without `=` (`-smp 2` is `cpus=2`).
pub(in crate::vm::qemu) struct Schema {
    pub(in crate::vm::qemu) implied: Option<&'static str>,
    pub(in crate::vm::qemu) keys: &'static [(&'static str, V)],
}

pub(in crate::vm::qemu) const BOOLS: &[&str] = &["on", "off", "true", "false", "yes", "no", "auto"];

pub(in crate::vm::qemu) const MACHINE: Schema = Schema {
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
pub(in crate::vm::qemu) const ACCEL: Schema = Schema {
    implied: Some("accel"),
    keys: &[
        ("accel", V::OneOf(&["kvm", "tcg"])),
        ("thread", V::OneOf(&["single", "multi"])),
        ("tb-size", V::Num),
        ("kernel-irqchip", V::OneOf(&["on", "off", "split"])),
    ],
};
pub(in crate::vm::qemu) const SMP: Schema = Schema {
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
pub(in crate::vm::qemu) const MEM: Schema =
    Schema { implied: Some("size"), keys: &[("size", V::Size), ("slots", V::Num), ("maxmem", V::Size)] };
pub(in crate::vm::qemu) const NUMA: Schema = Schema {
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
pub(in crate::vm::qemu) const NAME: Schema =
    Schema { implied: Some("guest"), keys: &[("guest", V::Text), ("process", V::Word), ("debug-threads", V::Bool)] };
pub(in crate::vm::qemu) const BOOT: Schema = Schema {
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
pub(in crate::vm::qemu) const RTC: Schema = Schema {
    implied: None,
    keys: &[("base", V::Word), ("clock", V::OneOf(&["host", "rt", "vm"])), ("driftfix", V::OneOf(&["none", "slew"]))],
};
pub(in crate::vm::qemu) const OVERCOMMIT: Schema =
    Schema { implied: None, keys: &[("mem-lock", V::OneOf(&["on", "off", "on-fault"])), ("cpu-pm", V::Bool)] };
pub(in crate::vm::qemu) const MSG: Schema =
    Schema { implied: None, keys: &[("timestamp", V::Bool), ("guest-name", V::Bool)] };
pub(in crate::vm::qemu) const ACTION: Schema = Schema {
    implied: None,
    keys: &[("reboot", V::Word), ("shutdown", V::Word), ("panic", V::Word), ("watchdog", V::Word)],
};
pub(in crate::vm::qemu) const DISPLAY: Schema =
    Schema { implied: Some("type"), keys: &[("type", V::OneOf(&["none"]))] };
pub(in crate::vm::qemu) const SMBIOS: Schema = Schema {
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
pub(in crate::vm::qemu) const FW_CFG: Schema =
    Schema { implied: None, keys: &[("name", V::Text), ("string", V::Text)] };
/// `-object` kinds. Memory backends are rewritten onto the agent's files
/// (their `mem-path` and preallocation are replaced, see `destination_args`).
pub(in crate::vm::qemu) const OBJECTS: &[(&str, Schema)] = &[
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
pub(in crate::vm::qemu) const MEMORY_BACKEND: Schema = Schema {
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
pub(in crate::vm::qemu) const NETDEVS: &[(&str, Schema)] = &[
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
pub(in crate::vm::qemu) const CHARDEVS: &[(&str, Schema)] = &[
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

/// `-device` drivers: common virtio, storage, network, serial, USB, PCI
/// topology and display devices. Their properties are ids, numbers and
/// words; the only one that names a host file, `romfile`, is refused.
pub(in crate::vm::qemu) const DEVICES: &[&str] = &[
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
pub(in crate::vm::qemu) const GLOBAL_DRIVERS: &[&str] =
    &["kvm-pit", "ICH9-LPC", "PIIX4_PM", "isa-fdc", "mch", "q35-pcihost", "i440FX-pcihost"];

/// How an option's value is read.
pub(in crate::vm::qemu) enum Opt {
    /// No value.
    Flag,
    /// QEMU's key=value syntax (or JSON) against one schema.
    Keyval(&'static Schema),
    /// Key=value or JSON whose first item (or a kind key) selects the schema.
    Kinds,
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

/// Every option a command line may have, and how its value is read; a
/// source reads each into its description (`describe`). Options the agent
/// sets itself are taken out before (`-qmp`, `-incoming`, `-S`,
/// `-sandbox`, ...: see `strip_control`).
pub(in crate::vm::qemu) const OPTIONS: &[(&str, Opt)] = &[
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
    ("object", Opt::Kinds),
    ("netdev", Opt::Kinds),
    ("nic", Opt::Kinds),
    ("net", Opt::Value(V::OneOf(&["none"]))),
    ("chardev", Opt::Kinds),
    ("blockdev", Opt::Kinds),
    ("drive", Opt::Kinds),
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
pub(in crate::vm::qemu) const MAX_TEXT: usize = 4096;

/// RAM backend properties a description carries (the destination makes
/// the backend itself: a shared file of its own, never a path from a peer).
pub(in crate::vm::qemu) const RAM_PROPS: Schema = Schema {
    implied: None,
    keys: &[
        ("merge", V::Bool),
        ("dump", V::Bool),
        ("policy", V::OneOf(&["default", "preferred", "bind", "interleave"])),
        ("host-nodes", V::Word),
        ("prealloc-threads", V::Num),
        ("reserve", V::Bool),
        ("align", V::Size),
        ("discard-data", V::Bool),
        ("x-use-canonical-path-for-ramblock-id", V::Bool),
    ],
};

/// Block options a description's disk carries.
pub(in crate::vm::qemu) const DISK_PROPS: Schema = Schema {
    implied: None,
    keys: &[
        ("cache.direct", V::Bool),
        ("cache.no-flush", V::Bool),
        ("discard", V::OneOf(&["ignore", "unmap"])),
        ("detect-zeroes", V::OneOf(&["on", "off", "unmap"])),
        ("aio", V::OneOf(&["threads", "native", "io_uring"])),
    ],
};

/// `-nic` properties a description carries besides the backend.
pub(in crate::vm::qemu) const NIC_PROPS: Schema =
    Schema { implied: None, keys: &[("model", V::Word), ("mac", V::Word)] };

/// Options with no host resource in them, carried as they are: flags, or
/// a value checked by its rule.
pub(in crate::vm::qemu) const PLAIN_OPTIONS: &[(&str, Opt)] = &[
    ("nodefaults", Opt::Flag),
    ("no-user-config", Opt::Flag),
    ("nographic", Opt::Flag),
    ("no-reboot", Opt::Flag),
    ("no-shutdown", Opt::Flag),
    ("enable-kvm", Opt::Flag),
    ("no-hpet", Opt::Flag),
    ("usb", Opt::Flag),
    ("name", Opt::Keyval(&NAME)),
    ("uuid", Opt::Value(V::Word)),
    ("boot", Opt::Keyval(&BOOT)),
    ("rtc", Opt::Keyval(&RTC)),
    ("overcommit", Opt::Keyval(&OVERCOMMIT)),
    ("msg", Opt::Keyval(&MSG)),
    ("action", Opt::Keyval(&ACTION)),
    ("watchdog-action", Opt::Value(V::Word)),
    ("vga", Opt::Value(V::OneOf(&["none", "std", "virtio", "cirrus", "qxl"]))),
    ("smbios", Opt::Keyval(&SMBIOS)),
    ("fw_cfg", Opt::Keyval(&FW_CFG)),
    ("k", Opt::Value(V::Word)),
    ("net", Opt::Value(V::OneOf(&["none"]))),
    ("parallel", Opt::Value(V::OneOf(&["none", "null"]))),
];
