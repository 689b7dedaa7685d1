//! Bounds-checked reads from packet memory.

use core::mem::size_of;

/// Headers are looked for in the first `MAX_HEADER_OFFSET` bytes. The bound also tells
/// the verifier that every computed offset is limited.
pub const MAX_HEADER_OFFSET: usize = 512;

/// The packet bytes `[start, end)` as the program context gives them.
pub struct PacketView {
    start: usize,
    end: usize,
}

/// A read past the end of the packet.
pub struct OutOfBounds;

impl PacketView {
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    /// Copies the `T` at `offset` out of the packet.
    ///
    /// `T` must be a plain byte-layout type (integers, byte arrays): any bit pattern
    /// is a valid value.
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Result<T, OutOfBounds> {
        if offset > MAX_HEADER_OFFSET {
            return Err(OutOfBounds);
        }
        let at = self.start + offset;
        if at + size_of::<T>() > self.end {
            return Err(OutOfBounds);
        }
        // SAFETY: `[at, at + size_of::<T>())` lies inside the packet (checked above),
        // the read is unaligned-safe, and callers only read integer and byte-array
        // types, for which every bit pattern is valid.
        Ok(unsafe { core::ptr::read_unaligned(at as *const T) })
    }

    /// Copies the `N` bytes at `offset` into `out`, straight from packet to
    /// destination (a `read` would stage them in registers and on the stack).
    #[inline(always)]
    pub fn copy_into<const N: usize>(
        &self,
        offset: usize,
        out: &mut [u8; N],
    ) -> Result<(), OutOfBounds> {
        if offset > MAX_HEADER_OFFSET {
            return Err(OutOfBounds);
        }
        let at = self.start + offset;
        if at + N > self.end {
            return Err(OutOfBounds);
        }
        // SAFETY: `[at, at + N)` lies inside the packet (checked above), `out` is a
        // distinct, writable N-byte array, and byte copies need no alignment.
        unsafe { core::ptr::copy_nonoverlapping(at as *const u8, out.as_mut_ptr(), N) };
        Ok(())
    }

    #[inline(always)]
    pub fn u8_at(&self, offset: usize) -> Result<u8, OutOfBounds> {
        self.read::<u8>(offset)
    }

    /// A big-endian (network order) u16.
    #[inline(always)]
    pub fn be16_at(&self, offset: usize) -> Result<u16, OutOfBounds> {
        self.read::<[u8; 2]>(offset).map(u16::from_be_bytes)
    }
}
