//! Block-wise quantization of Burn tensors: the typed API over [`crate::BlockwiseOps`].

use burn::backend::Dispatch;
use burn::tensor::{DType, Device, FloatDType, Int, Shape, Tensor, TensorData};

use crate::block::{BlockSize, length_mismatch};
use crate::host;
use crate::error::QuantError;
use crate::ext::BlockwiseOps;
use crate::map::MapKind;

/// A tensor quantized block-wise to 8-bit or 4-bit codes (the map's [`MapKind::bits`]): packed
/// `u32` codes ([`MapKind::codes_per_word`] per word), one `f32`
/// absmax per block, and what is needed to decode them (shape, block size, map).
///
/// The tensor is flattened in row-major order and cut into blocks of `block_size` elements; the
/// last block may be partial, and any length works, including 0.
///
/// # Non-finite input
/// A block that holds a NaN stores absmax NaN; one that holds ±∞ (and no NaN) stores +∞. Such a
/// block gets the zero code everywhere and **dequantizes to NaN in every element**: a non-finite
/// input never turns into finite codes silently. [`BlockQuantized::check_finite`] reports such
/// blocks as an error when the caller wants one (it reads absmax back to the host).
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_8bit_ops::{BlockQuantized, BlockSize, MapKind};
///
/// let device = Device::default();
/// let x = Tensor::<2>::from_floats([[0.5, -1.0, 0.25], [2.0, 0.0, -0.125]], &device);
/// let q = BlockQuantized::quantize(x.clone(), MapKind::DynamicSigned, BlockSize::new(64)?);
/// assert_eq!(q.num_blocks(), 1);
/// let y = q.dequantize::<2>()?;
/// let error = (x - y).abs().max().into_scalar::<f32>();
/// assert!(error < 0.02);
/// # Ok::<(), burn_8bit_ops::QuantError>(())
/// ```
#[derive(Clone, Debug)]
pub struct BlockQuantized {
    codes: Tensor<1, Int>,
    absmax: Tensor<1>,
    shape: Shape,
    block_size: BlockSize,
    map: MapKind,
}

impl BlockQuantized {
    /// Quantizes `tensor` (any float dtype; the arithmetic is `f32`) on its own device.
    ///
    /// Quantization is not differentiable: a tensor on an autodiff device is quantized as a
    /// constant, and the codes live on the inner (non-autodiff) device.
    pub fn quantize<const D: usize>(tensor: Tensor<D>, map: MapKind, block_size: BlockSize) -> Self {
        let tensor = tensor.without_autodiff();
        let shape = tensor.shape();
        let device = tensor.device();
        let len = shape.num_elements();
        let (codes, absmax) = if len == 0 {
            (empty_codes(&device), Tensor::<1>::empty([0], (&device, DType::F32)))
        } else {
            let flat = tensor.cast(FloatDType::F32).reshape([len]);
            let packed = Dispatch::blockwise_quantize(flat.into_dispatch(), map, block_size.get());
            (
                Tensor::from_dispatch(packed.codes),
                Tensor::from_dispatch(packed.absmax),
            )
        };
        Self {
            codes,
            absmax,
            shape,
            block_size,
            map,
        }
    }

    /// Quantizes against one absmax for the whole tensor, `max |x|`, stored in every block: the
    /// paper's ablation without block-wise scaling. The layout is that of
    /// [`BlockQuantized::quantize`], so it decodes like any other, but one outlier sets the
    /// scale of every element.
    ///
    /// ```
    /// use burn::tensor::{Device, Tensor};
    /// use burn_8bit_ops::{BlockQuantized, BlockSize, MapKind};
    ///
    /// let x = Tensor::<1>::from_floats([0.5; 128], &Device::default()).slice_assign([0..1], Tensor::from_floats([8.0], &Device::default()));
    /// let q = BlockQuantized::quantize_whole_tensor(x, MapKind::DynamicSigned, BlockSize::new(64).unwrap());
    /// assert_eq!(q.absmax_values(), [8.0, 8.0]);
    /// ```
    pub fn quantize_whole_tensor<const D: usize>(
        tensor: Tensor<D>,
        map: MapKind,
        block_size: BlockSize,
    ) -> Self {
        let tensor = tensor.without_autodiff();
        let shape = tensor.shape();
        let len = shape.num_elements();
        if len == 0 {
            return Self::quantize(tensor, map, block_size);
        }
        let flat = tensor.cast(FloatDType::F32).reshape([len]);
        let absmax = flat.clone().abs().max().repeat_dim(0, block_size.num_blocks(len));
        let packed = Dispatch::blockwise_encode(
            flat.into_dispatch(),
            absmax.into_dispatch(),
            map,
            block_size.get(),
        );
        Self {
            codes: Tensor::from_dispatch(packed.codes),
            absmax: Tensor::from_dispatch(packed.absmax),
            shape,
            block_size,
            map,
        }
    }

    /// The quantized form of a tensor of zeros: every code is the map's zero code, every absmax 0,
    /// so it decodes to exact zeros. Optimizer states start here.
    pub fn zeros(shape: Shape, map: MapKind, block_size: BlockSize, device: &Device) -> Self {
        let len = shape.num_elements();
        let (bits, per_word) = (map.bits() as usize, map.codes_per_word());
        let zero = u32::from(map.map().zero_code());
        let full_word = (0..per_word).fold(0u32, |word, j| word | zero << (bits * j));
        let num_words = map.num_words(len);
        let mut words = vec![full_word; num_words];
        if let Some(last) = words.last_mut() {
            let unused = num_words * per_word - len;
            *last &= u32::MAX >> (bits * unused);
        }
        let codes = Tensor::from_data(TensorData::new(words, [num_words]), (device, DType::U32));
        // Uploaded rather than `Tensor::zeros`, for the reason `Optim8bitState::new` gives.
        let blocks = block_size.num_blocks(len);
        let absmax = Tensor::from_data(TensorData::new(vec![0f32; blocks], [blocks]), (device, DType::F32));
        Self {
            codes,
            absmax,
            shape,
            block_size,
            map,
        }
    }

    /// The packed codes and absmax, consumed (see [`BlockQuantized::codes`]).
    pub fn into_parts(self) -> (Tensor<1, Int>, Tensor<1>) {
        (self.codes, self.absmax)
    }

    /// Reassembles a quantized tensor from its parts, checking that they describe one tensor:
    /// `codes` is `u32` with `map.num_words(n)` words and `absmax` is `f32` with `ceil(n / block)`
    /// entries, `n` being the number of elements of `shape`.
    pub fn from_parts(
        codes: Tensor<1, Int>,
        absmax: Tensor<1>,
        shape: Shape,
        block_size: BlockSize,
        map: MapKind,
    ) -> Result<Self, QuantError> {
        let len = shape.num_elements();
        let problems = [
            (codes.dtype() != DType::U32).then(|| format!("codes are {:?}, not U32", codes.dtype())),
            (absmax.dtype() != DType::F32)
                .then(|| format!("absmax is {:?}, not F32", absmax.dtype())),
            length_mismatch(codes.dims()[0], absmax.dims()[0], len, block_size, map),
        ];
        if let Some(reason) = problems.into_iter().flatten().next() {
            return Err(QuantError::Inconsistent { reason });
        }
        Ok(Self {
            codes,
            absmax,
            shape,
            block_size,
            map,
        })
    }

    /// Decodes into a tensor of the original shape; [`QuantError::Inconsistent`] when `D` is not
    /// the original rank.
    pub fn dequantize<const D: usize>(&self) -> Result<Tensor<D>, QuantError> {
        if self.shape.num_dims() != D {
            return Err(QuantError::Inconsistent {
                reason: format!("asked for rank {D}, the tensor has rank {}", self.shape.num_dims()),
            });
        }
        if self.is_empty() {
            // Burn's `reshape` reads a 0 in the target shape as "keep this dimension".
            return Ok(Tensor::empty(self.shape.clone(), (&self.device(), DType::F32)));
        }
        Ok(self.dequantize_flat().reshape(self.shape.clone()))
    }

    /// Decodes into a flat tensor of [`BlockQuantized::len`] elements.
    pub fn dequantize_flat(&self) -> Tensor<1> {
        let output = Tensor::empty([self.len()], (&self.device(), DType::F32));
        self.decode_into(output)
    }

    /// Decodes into `output`, a tensor of the original shape whose values are discarded, and
    /// returns it: where the backend allows (Flex and the CubeCL backends, when `output` is
    /// contiguous and not shared), the values are written into `output`'s own memory, so decoding
    /// again into the last result allocates nothing. A shared `output` (one with live clones) is
    /// never modified: the values go to fresh memory instead.
    ///
    /// [`QuantError::OutputMismatch`] when `output` has another shape, is not `f32`, or lives on
    /// another device than the codes (an autodiff device counts as its inner device; the result
    /// is not tracked).
    ///
    /// ```
    /// use burn::tensor::{Device, Tensor};
    /// use burn_8bit_ops::{BlockQuantized, BlockSize, MapKind};
    ///
    /// let device = Device::default();
    /// let q = BlockQuantized::quantize(Tensor::<1>::from_floats([0.5, -1.0, 0.25], &device), MapKind::DynamicSigned, BlockSize::new(64)?);
    /// let mut decoded = q.dequantize::<1>()?;
    /// let first = decoded.clone().into_data();
    /// for _ in 0..3 {
    ///     decoded = q.dequantize_into(decoded)?; // into the previous result's memory
    /// }
    /// assert_eq!(decoded.into_data(), first);
    /// # Ok::<(), burn_8bit_ops::QuantError>(())
    /// ```
    pub fn dequantize_into<const D: usize>(&self, output: Tensor<D>) -> Result<Tensor<D>, QuantError> {
        let output = output.without_autodiff();
        let problems = [
            (output.shape() != self.shape)
                .then(|| format!("output shape {:?}, quantized shape {:?}", output.shape(), self.shape)),
            (output.dtype() != DType::F32).then(|| format!("output is {:?}, not F32", output.dtype())),
            (output.device() != self.device())
                .then(|| format!("output on {:?}, codes on {:?}", output.device(), self.device())),
        ];
        if let Some(reason) = problems.into_iter().flatten().next() {
            return Err(QuantError::OutputMismatch { reason });
        }
        if self.is_empty() {
            return Ok(output);
        }
        Ok(self.decode_into(output.reshape([self.len()])).reshape(self.shape.clone()))
    }

    /// Decodes into `output`, flat `f32` of [`BlockQuantized::len`] elements on the codes' device.
    fn decode_into(&self, output: Tensor<1>) -> Tensor<1> {
        if self.is_empty() {
            return output;
        }
        Tensor::from_dispatch(Dispatch::blockwise_dequantize(
            self.codes.clone().into_dispatch(),
            self.absmax.clone().into_dispatch(),
            output.into_dispatch(),
            self.map,
            self.block_size.get(),
        ))
    }

    /// [`QuantError::NonFinite`] when any block held NaN or ±∞. Reads absmax back to the host.
    pub fn check_finite(&self) -> Result<(), QuantError> {
        let absmax = self.absmax_values();
        let mut bad = absmax.iter().enumerate().filter(|(_, a)| !a.is_finite());
        match bad.next() {
            None => Ok(()),
            Some((first, _)) => Err(QuantError::NonFinite {
                blocks: 1 + bad.count(),
                first,
            }),
        }
    }

    /// The codes, one byte per element (reads them back to the host).
    pub fn unpacked_codes(&self) -> Vec<u8> {
        let words = self.codes.clone().into_data();
        host::unpack(words.as_slice::<u32>().expect("codes are u32"), self.map, self.len())
    }

    /// The absmax of every block (reads them back to the host).
    pub fn absmax_values(&self) -> Vec<f32> {
        self.absmax.clone().into_data().try_to_vec::<f32>().expect("absmax is f32")
    }

    /// Moves the quantized tensor to another device.
    pub fn to_device(self, device: &Device) -> Self {
        Self {
            codes: self.codes.to_device(device),
            absmax: self.absmax.to_device(device),
            ..self
        }
    }

    /// The packed codes: `u32`, [`MapKind::codes_per_word`] codes per word, from the lowest bits up.
    pub fn codes(&self) -> &Tensor<1, Int> {
        &self.codes
    }

    /// One `f32` absmax per block.
    pub fn absmax(&self) -> &Tensor<1> {
        &self.absmax
    }

    /// The shape of the tensor that was quantized.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.num_elements()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block size.
    pub fn block_size(&self) -> BlockSize {
        self.block_size
    }

    /// Number of blocks (the last may be partial).
    pub fn num_blocks(&self) -> usize {
        self.block_size.num_blocks(self.len())
    }

    /// The code map.
    pub fn map(&self) -> MapKind {
        self.map
    }

    /// The device the codes live on.
    pub fn device(&self) -> Device {
        self.codes.device()
    }

    /// Bytes of device memory held: 4 per code word plus 4 per block.
    pub fn size_bytes(&self) -> usize {
        4 * self.map.num_words(self.len()) + 4 * self.num_blocks()
    }
}

fn empty_codes(device: &Device) -> Tensor<1, Int> {
    Tensor::from_data(TensorData::new(Vec::<u32>::new(), [0]), (device, DType::U32))
}
