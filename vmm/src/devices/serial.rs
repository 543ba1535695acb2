//! The serial console: a 16550 UART from `vm-superio`, shared by all vCPUs, printing whole lines to
//! quietvm's standard output.

use std::io::Write;

use vm_superio::{Serial, Trigger};

use crate::sync::NoSleepMutex;

/// The console's interrupt line is not wired: the guest polls, and quietvm never injects serial IRQs.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// Collects bytes and writes each complete line at once, so lines of different vCPUs never mix.
pub struct LineWriter<W: Write> {
    line: Vec<u8>,
    out: W,
}

impl<W: Write> Write for LineWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= 4096 {
                self.flush_line()?;
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

impl<W: Write> LineWriter<W> {
    fn flush_line(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.out.write_all(&self.line)?;
            self.out.flush()?;
            self.line.clear();
        }
        Ok(())
    }
}

/// The UART behind a lock (vCPU threads write it concurrently).
pub struct SerialConsole<W: Write> {
    uart: NoSleepMutex<Serial<NoInterrupt, vm_superio::serial::NoEvents, LineWriter<W>>>,
}

impl<W: Write> SerialConsole<W> {
    pub fn new(out: W) -> Self {
        SerialConsole {
            uart: NoSleepMutex::new(Serial::new(
                NoInterrupt,
                LineWriter {
                    line: Vec::new(),
                    out,
                },
            )),
        }
    }

    /// A guest `out` to register `offset`.
    pub fn write(&self, offset: u8, value: u8) {
        let mut uart = self.uart.lock();
        if let Err(e) = uart.write(offset, value) {
            log::debug!("serial write: {e:?}");
        }
    }

    /// A guest `in` from register `offset`.
    pub fn read(&self, offset: u8) -> u8 {
        self.uart.lock().read(offset)
    }

    /// Writes out a last line the guest did not end with a newline.
    pub fn flush(&self) {
        let mut uart = self.uart.lock();
        let _ = uart.writer_mut().flush_line();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_come_out_as_whole_lines() {
        let console = SerialConsole::new(Vec::new());
        for b in b"hi\nthere" {
            console.write(0, *b);
        }
        assert_eq!(console.uart.lock().writer().out, b"hi\n");
        console.flush();
        assert_eq!(console.uart.lock().writer().out, b"hi\nthere");
    }
}
