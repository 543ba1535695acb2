//! Pins every number and layout of the guest ABI to its literal value (docs/boot.md,
//! docs/timer-abi.md). A failure here means the wire ABI changed: if that was meant, bump
//! `ABI_VERSION`, update the docs and both sides, then this test.

use core::mem::{align_of, offset_of, size_of};
use quietvm_abi::{boot, ports, queue, report, timer, ABI_VERSION};

/// `$ty.$field` is at byte `$at`, and so says its offset constant.
macro_rules! at {
    ($ty:ident, $field:ident, $constant:expr, $at:expr) => {
        assert_eq!(
            offset_of!($ty, $field) as u64,
            $at,
            concat!(stringify!($ty), ".", stringify!($field))
        );
        assert_eq!($constant, $at, stringify!($constant));
    };
}

#[test]
fn abi_version() {
    assert_eq!(ABI_VERSION, 1);
    assert_eq!(boot::VERSION, 1);
}

#[test]
fn memory_map_and_entry_state() {
    assert_eq!(boot::PAGE_SIZE, 4096);
    assert_eq!(boot::BOOT_GDT, 0x1000);
    assert_eq!(boot::BOOT_INFO, 0x2000);
    assert_eq!(boot::PML4, 0x1_0000);
    assert_eq!(boot::PDPT, 0x1_1000);
    assert_eq!(boot::FIRST_PD, 0x1_2000);
    assert_eq!(boot::IMAGE_BASE, 0x10_0000);
    assert_eq!(boot::PERCPU_SIZE, 0x2_0000);
    assert_eq!(boot::CODE_SELECTOR, 0x08);
    assert_eq!(boot::DATA_SELECTOR, 0x10);
    assert_eq!(boot::MAGIC, 0x3154_4f4f_424d_5651);
    assert_eq!(&boot::MAGIC.to_le_bytes(), b"QVMBOOT1");
    assert_eq!(boot::ARGS_SIZE, 512);
}

#[test]
fn boot_info_layout() {
    use boot::{offset, BootInfo};
    at!(BootInfo, magic, offset::MAGIC, 0x00);
    at!(BootInfo, version, offset::VERSION, 0x08);
    at!(BootInfo, vcpus, offset::VCPUS, 0x0c);
    at!(BootInfo, mem_size, offset::MEM_SIZE, 0x10);
    at!(BootInfo, device_pages, offset::DEVICE_PAGES, 0x18);
    at!(BootInfo, percpu_base, offset::PERCPU_BASE, 0x20);
    at!(BootInfo, percpu_size, offset::PERCPU_SIZE, 0x28);
    at!(BootInfo, free_base, offset::FREE_BASE, 0x30);
    at!(BootInfo, serial_port, offset::SERIAL_PORT, 0x38);
    at!(BootInfo, exit_port, offset::EXIT_PORT, 0x3a);
    at!(BootInfo, timer_port, offset::TIMER_PORT, 0x3c);
    at!(BootInfo, doorbell_vector, offset::DOORBELL_VECTOR, 0x3e);
    at!(BootInfo, max_timers, offset::MAX_TIMERS, 0x40);
    at!(BootInfo, args_len, offset::ARGS_LEN, 0x44);
    at!(BootInfo, args, offset::ARGS, 0x48);
    at!(BootInfo, tsc_khz, offset::TSC_KHZ, 0x248);
    at!(BootInfo, report_port, offset::REPORT_PORT, 0x24c);
    at!(BootInfo, payload_base, offset::PAYLOAD_BASE, 0x250);
    at!(BootInfo, payload_len, offset::PAYLOAD_LEN, 0x258);
    at!(BootInfo, timer_states, offset::TIMER_STATES, 0x260);
    assert_eq!(offset_of!(BootInfo, reserved), 0x3f);
    assert_eq!(offset_of!(BootInfo, reserved2), 0x24e);
    assert_eq!(size_of::<BootInfo>(), 0x268);
    assert_eq!(boot::BOOT_INFO_SIZE, 0x268);
    assert_eq!(align_of::<BootInfo>(), 8);
}

#[test]
fn ports() {
    assert_eq!(ports::SERIAL_PORT, 0x3f8);
    assert_eq!(ports::SERIAL_PORT_COUNT, 8);
    assert_eq!(ports::EXIT_PORT, 0x510);
    assert_eq!(ports::TIMER_PORT, 0x520);
    assert_eq!(ports::REPORT_PORT, 0x530);
}

#[test]
fn timer_numbers() {
    assert_eq!(timer::DOORBELL_VECTOR, 0x20);
    assert_eq!(timer::DEVICE_PAGE_SIZE, 4096);

    assert_eq!(timer::CMD_NOW, 1);
    assert_eq!(timer::CMD_ARM, 2);
    assert_eq!(timer::CMD_CANCEL, 3);
    assert_eq!(timer::CMD_CANCEL_SYNC, 4);
    assert_eq!(timer::CMD_POP, 5);
    assert_eq!(timer::CMD_ACK, 6);
    assert_eq!(timer::CMD_OFFLINE_ACK, 7);
    assert_eq!(timer::CMD_ENABLE_QUEUES, 8);
    assert_eq!(timer::CMD_SYNC, 9);

    assert_eq!(timer::OK, 0);
    assert_eq!(timer::EMPTY, 1);
    assert_eq!(timer::PAST, 2);
    assert_eq!(timer::RUNNING, 3);
    assert_eq!(timer::DEADLOCK, 4);
    assert_eq!(timer::BAD_ACK, 5);
    assert_eq!(timer::INVALID, 6);
    assert_eq!(timer::UNKNOWN_COMMAND, 7);
    assert_eq!(timer::BAD_ACCESS, 8);

    assert_eq!(timer::FLAG_PINNED, 1);
    assert_eq!(timer::FLAG_MOVABLE, 2);
    assert_eq!(timer::NO_TIMER, 0xffff_ffff);

    assert_eq!(timer::CONTROL_NONE, 0);
    assert_eq!(timer::CONTROL_OFFLINE_REQUESTED, 1);
    assert_eq!(timer::CONTROL_ONLINE, 2);
}

#[test]
fn device_page_layout() {
    use timer::Page;
    at!(Page, id, timer::OFF_ID, 0x00);
    at!(Page, flags, timer::OFF_FLAGS, 0x04);
    at!(Page, deadline, timer::OFF_DEADLINE, 0x08);
    at!(Page, status, timer::OFF_STATUS, 0x10);
    at!(Page, value, timer::OFF_VALUE, 0x18);
    at!(Page, now, timer::OFF_NOW, 0x20);
    at!(Page, exp_id, timer::OFF_EXP_ID, 0x28);
    at!(Page, exp_owner, timer::OFF_EXP_OWNER, 0x2c);
    at!(Page, exp_deadline, timer::OFF_EXP_DEADLINE, 0x30);
    at!(Page, exp_fired_at, timer::OFF_EXP_FIRED_AT, 0x38);
    assert_eq!(offset_of!(Page, reserved), 0x14);
    assert_eq!(timer::OFF_CONTROL, 0x40);
    assert_eq!(size_of::<Page>(), 0x40);
    assert_eq!(align_of::<Page>(), 8);
}

#[test]
fn window_block_layout() {
    use timer::PageWindow;
    assert_eq!(timer::OFF_WINDOW, 0x48);
    assert_eq!(offset_of!(PageWindow, slack), 0);
    assert_eq!(offset_of!(PageWindow, exp_slack), 8);
    assert_eq!(timer::OFF_SLACK, 0x48);
    assert_eq!(timer::OFF_EXP_SLACK, 0x50);
    assert_eq!(size_of::<PageWindow>(), 0x10);
    assert_eq!(align_of::<PageWindow>(), 8);
    assert_eq!(timer::MAX_SLACK_NS, 1_000_000_000);
    assert_eq!(timer::WINDOW_TOLERANCE_NS, 1_000_000);
}

#[test]
fn timer_report_layout() {
    use report::{offset, Header, VcpuEntry};
    assert_eq!(report::MAGIC, 0x3130_5450_524d_5651);
    assert_eq!(&report::MAGIC.to_le_bytes(), b"QVMRPT01");
    assert_eq!(report::VERSION, 1);
    assert_eq!(report::PAGE_SHIFT, 12);
    assert_eq!(report::MAX_SAMPLES_PER_VCPU, 1 << 24);

    at!(Header, magic, offset::MAGIC, 0x00);
    at!(Header, version, offset::VERSION, 0x08);
    at!(Header, vcpus, offset::VCPUS, 0x0c);
    at!(Header, armed, offset::ARMED, 0x10);
    at!(Header, fired, offset::FIRED, 0x18);
    at!(Header, cancelled, offset::CANCELLED, 0x20);
    at!(Header, early, offset::EARLY, 0x28);
    at!(Header, missed, offset::MISSED, 0x30);
    at!(Header, remote_expiries, offset::REMOTE_EXPIRIES, 0x38);
    at!(Header, serialized, offset::SERIALIZED, 0x40);
    assert_eq!(offset_of!(Header, reserved), 0x48);
    assert_eq!(size_of::<Header>(), 0x80);
    assert_eq!(offset::VCPU_ENTRIES, 0x80);
    at!(VcpuEntry, fired, offset::ENTRY_FIRED, 0);
    at!(VcpuEntry, remote_fired, offset::ENTRY_REMOTE_FIRED, 8);
    at!(VcpuEntry, samples_addr, offset::ENTRY_SAMPLES_ADDR, 16);
    at!(VcpuEntry, samples_len, offset::ENTRY_SAMPLES_LEN, 24);
    assert_eq!(size_of::<VcpuEntry>(), 32);
    assert_eq!(report::VCPU_ENTRY_SIZE, 32);
}

#[test]
fn queue_numbers() {
    // State words.
    assert_eq!(queue::STATE_GEN_MASK, 0xffff_ffff);
    assert_eq!(queue::STATE_PENDING, 0x1_0000_0000);
    assert_eq!(queue::STATE_RUNNING, 0x2_0000_0000);
    assert_eq!(queue::STATE_HELD, 0x4_0000_0000);
    assert_eq!(queue::STATE_CPU_SHIFT, 48);
    assert_eq!(queue::CAS_TRIES, 1024);
    // The running vCPU is in bits 48-63; bits 35-47 are 0 in every word a transition writes.
    let w = queue::State(0xabcd_0000_0000_0000 | queue::STATE_RUNNING);
    assert_eq!(w.running_on(), Some(0xabcd));

    // Rings and entries.
    assert_eq!(queue::SUB_ENTRIES, 32);
    assert_eq!(queue::DELIVERY_ENTRIES, 32);
    assert_eq!(queue::OP_ARM, 1);
    assert_eq!(queue::OP_CANCEL, 2);
    assert_eq!(queue::ENDED_PENDING, 0x100);
    assert_eq!(queue::ARM_KIND_MASK, 3);
}

#[test]
fn queue_control_layout() {
    use queue::{ClockParams, QueueControl};
    assert_eq!(queue::OFF_QUEUES, 0x80);
    at!(QueueControl, enabled, queue::OFF_Q_ENABLED - 0x80, 0x00);
    at!(QueueControl, sub_head, queue::OFF_Q_SUB_HEAD - 0x80, 0x04);
    at!(QueueControl, sub_tail, queue::OFF_Q_SUB_TAIL - 0x80, 0x08);
    at!(QueueControl, dlv_head, queue::OFF_Q_DLV_HEAD - 0x80, 0x0c);
    at!(QueueControl, dlv_tail, queue::OFF_Q_DLV_TAIL - 0x80, 0x10);
    assert_eq!(offset_of!(QueueControl, reserved), 0x14);
    at!(QueueControl, horizon, queue::OFF_Q_HORIZON - 0x80, 0x18);
    at!(QueueControl, clock, queue::OFF_Q_CLOCK - 0x80, 0x20);
    assert_eq!(size_of::<QueueControl>(), 0x38);
    assert_eq!(align_of::<QueueControl>(), 8);

    // The page offsets, as docs/timer-abi.md's table ("Queue mode", "Shared memory") gives them.
    assert_eq!(queue::OFF_Q_ENABLED, 0x80);
    assert_eq!(queue::OFF_Q_SUB_HEAD, 0x84);
    assert_eq!(queue::OFF_Q_SUB_TAIL, 0x88);
    assert_eq!(queue::OFF_Q_DLV_HEAD, 0x8c);
    assert_eq!(queue::OFF_Q_DLV_TAIL, 0x90);
    assert_eq!(queue::OFF_Q_HORIZON, 0x98);
    assert_eq!(queue::OFF_Q_CLOCK, 0xa0);

    assert_eq!(offset_of!(ClockParams, version), 0x00);
    assert_eq!(offset_of!(ClockParams, reserved), 0x04);
    assert_eq!(offset_of!(ClockParams, tsc_base), 0x08);
    assert_eq!(offset_of!(ClockParams, ns_per_tick_q32), 0x10);
    assert_eq!(size_of::<ClockParams>(), 0x18);
    assert_eq!(align_of::<ClockParams>(), 8);
    // The clock's fields in the page: version 0xa0, tsc_base 0xa8, ns_per_tick_q32 0xb0.
    assert_eq!(
        queue::OFF_Q_CLOCK + offset_of!(ClockParams, version) as u64,
        0xa0
    );
    assert_eq!(
        queue::OFF_Q_CLOCK + offset_of!(ClockParams, tsc_base) as u64,
        0xa8
    );
    assert_eq!(
        queue::OFF_Q_CLOCK + offset_of!(ClockParams, ns_per_tick_q32) as u64,
        0xb0
    );
    // The queue block starts at the first 64-byte line after the window block, and ends before the
    // submission ring.
    assert_eq!(
        timer::OFF_WINDOW + size_of::<timer::PageWindow>() as u64,
        0x58
    );
    assert_eq!(queue::OFF_QUEUES + size_of::<QueueControl>() as u64, 0xb8);
}

#[test]
fn queue_entry_layouts() {
    use queue::{DeliveryEntry, SubEntry};
    assert_eq!(offset_of!(SubEntry, op), 0x00);
    assert_eq!(offset_of!(SubEntry, id), 0x04);
    assert_eq!(offset_of!(SubEntry, gen), 0x08);
    assert_eq!(offset_of!(SubEntry, flags), 0x0c);
    assert_eq!(offset_of!(SubEntry, deadline), 0x10);
    assert_eq!(offset_of!(SubEntry, slack), 0x18);
    assert_eq!(offset_of!(SubEntry, at), 0x20);
    assert_eq!(offset_of!(SubEntry, reserved), 0x28);
    assert_eq!(size_of::<SubEntry>(), 48);
    assert_eq!(align_of::<SubEntry>(), 8);

    assert_eq!(offset_of!(DeliveryEntry, id), 0x00);
    assert_eq!(offset_of!(DeliveryEntry, owner), 0x04);
    assert_eq!(offset_of!(DeliveryEntry, gen), 0x08);
    assert_eq!(offset_of!(DeliveryEntry, reserved), 0x0c);
    assert_eq!(offset_of!(DeliveryEntry, deadline), 0x10);
    assert_eq!(offset_of!(DeliveryEntry, slack), 0x18);
    assert_eq!(offset_of!(DeliveryEntry, fired_at), 0x20);
    assert_eq!(offset_of!(DeliveryEntry, reserved2), 0x28);
    assert_eq!(size_of::<DeliveryEntry>(), 48);
    assert_eq!(align_of::<DeliveryEntry>(), 8);
}

#[test]
fn queue_rings() {
    assert_eq!(queue::OFF_SUB_RING, 0x100);
    assert_eq!(queue::OFF_DELIVERY_RING, 0x800);
    // 32 slots of 48 bytes: 0x100..0x700 and 0x800..0xe00, inside the 4 KiB page.
    assert_eq!(queue::sub_slot(0), 0x100);
    assert_eq!(queue::sub_slot(1), 0x130);
    assert_eq!(queue::sub_slot(31), 0x6d0);
    assert_eq!(queue::sub_slot(32), 0x100);
    assert_eq!(queue::sub_slot(33), 0x130);
    assert_eq!(queue::sub_slot(u32::MAX), 0x6d0);
    assert_eq!(queue::sub_slot(u32::MAX.wrapping_add(1)), 0x100);
    assert_eq!(queue::delivery_slot(0), 0x800);
    assert_eq!(queue::delivery_slot(1), 0x830);
    assert_eq!(queue::delivery_slot(31), 0xdd0);
    assert_eq!(queue::delivery_slot(32), 0x800);
    assert_eq!(queue::delivery_slot(u32::MAX), 0xdd0);
    assert_eq!(queue::delivery_slot(u32::MAX.wrapping_add(1)), 0x800);
    assert!(queue::sub_slot(31) + 48 <= queue::OFF_DELIVERY_RING);
    assert!(queue::delivery_slot(31) + 48 <= timer::DEVICE_PAGE_SIZE);
}
