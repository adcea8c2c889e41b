//! Rank-1 normalised quantization of Burn tensors (docs/algorithm.md §2.4), the second-moment
//! scaling of Li, Chen and Zhu (2023), *Memory Efficient Optimizers with 4-bit States*.

use burn::tensor::{DType, Device, Int, Shape, Tensor, TensorData};

use crate::error::QuantError;
use crate::host;
use crate::map::MapKind;

/// A non-negative tensor quantized with rank-1 normalisation: the tensor viewed as a row-major
/// matrix of `dim0` rows and as many columns as its other dimensions hold
/// ([`Rank1Quantized::matrix`]), packed codes ([`MapKind::codes_per_word`] per `u32`), and the
/// largest magnitude of each row and of each column. Element `(i, j)` decodes to
/// `value[code] · min(rows[i], cols[j])`.
///
/// The norms cost `4 · (rows + cols)` bytes (block-wise absmax costs 4 per block): 0.002 bytes
/// per element of a 4096 × 4096 matrix, 0.06 of a 128 × 128 one, and all of a tensor's memory
/// when one side is short. The optimizers use rank-1 where the norms take no more memory than
/// the 4-bit codes ([`Rank1Quantized::fits`]). The fused step
/// keeps these states on the device; quantizing and decoding a whole tensor here goes through
/// the host (records, conversion and inspection).
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use burn_8bit_ops::{MapKind, Rank1Quantized};
///
/// let x = Tensor::<2>::from_floats([[1.0, 0.5], [0.25, 2.0]], &Device::default());
/// let q = Rank1Quantized::quantize(x.clone(), MapKind::LinearUnsigned4)?;
/// assert_eq!((q.row_norms(), q.col_norms()), (vec![1.0, 2.0], vec![1.0, 2.0]));
/// assert_eq!(q.dequantize::<2>()?.into_data(), x.into_data());
/// # Ok::<(), burn_8bit_ops::QuantError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Rank1Quantized {
    codes: Tensor<1, Int>,
    rows: Tensor<1>,
    cols: Tensor<1>,
    shape: Shape,
    map: MapKind,
}

impl Rank1Quantized {
    /// The matrix a tensor of `shape` is viewed as: `dim0` rows of the other dimensions'
    /// elements; `None` below rank 2 or without elements.
    pub fn matrix(shape: &Shape) -> Option<(usize, usize)> {
        let len = shape.num_elements();
        (shape.num_dims() >= 2 && len > 0).then(|| (shape[0], len / shape[0]))
    }

    /// Whether rank-1 norms of a tensor of `shape` take no more memory than its 4-bit codes,
    /// `4 · (rows + cols) ≤ n / 2` bytes: the optimizers' rule for using them. Every matrix of 64
    /// × 64 and up fits, so do most weights; a matrix with a short side does not (a `1 × n` or
    /// `n × 2` one would keep a norm per element).
    ///
    /// ```
    /// use burn_8bit_ops::Rank1Quantized;
    /// assert!(Rank1Quantized::fits(&[128, 128].into()));
    /// assert!(!Rank1Quantized::fits(&[4, 4096].into()));
    /// assert!(!Rank1Quantized::fits(&[16384].into())); // not a matrix
    /// ```
    pub fn fits(shape: &Shape) -> bool {
        Self::matrix(shape).is_some_and(|(rows, cols)| 8 * (rows + cols) <= shape.num_elements())
    }

    /// Quantizes `tensor` (rank ≥ 2, `f32` values read back to the host) in `map`.
    /// [`QuantError::Inconsistent`] below rank 2 or without elements.
    pub fn quantize<const D: usize>(tensor: Tensor<D>, map: MapKind) -> Result<Self, QuantError> {
        let shape = tensor.shape();
        let (_, cols) = Self::matrix(&shape).ok_or_else(|| not_a_matrix(&shape))?;
        let device = tensor.device();
        let values = tensor.into_data().convert::<f32>().try_to_vec::<f32>().expect("f32 values");
        let (words, rows, col_norms) = host::rank1_quantize(&values, cols, map)?;
        Ok(Self {
            codes: Tensor::from_data(TensorData::new(words.clone(), [words.len()]), (&device, DType::U32)),
            rows: upload(rows, &device),
            cols: upload(col_norms, &device),
            shape,
            map,
        })
    }

    /// The quantized form of zeros of `shape` (rank ≥ 2): every code 0 and every norm 0, so it
    /// decodes to exact zeros.
    pub fn zeros(shape: Shape, map: MapKind, device: &Device) -> Result<Self, QuantError> {
        let (rows, cols) = Self::matrix(&shape).ok_or_else(|| not_a_matrix(&shape))?;
        let words = map.num_words(shape.num_elements());
        Ok(Self {
            codes: Tensor::from_data(TensorData::new(vec![0u32; words], [words]), (device, DType::U32)),
            rows: upload(vec![0.0; rows], device),
            cols: upload(vec![0.0; cols], device),
            shape,
            map,
        })
    }

    /// Reassembles a quantized tensor from its parts, checking that they describe one tensor of
    /// `shape`: `u32` codes of `map.num_words(n)` words, `f32` norms of one per row and column.
    pub fn from_parts(
        codes: Tensor<1, Int>,
        rows: Tensor<1>,
        cols: Tensor<1>,
        shape: Shape,
        map: MapKind,
    ) -> Result<Self, QuantError> {
        let (num_rows, num_cols) = Self::matrix(&shape).ok_or_else(|| not_a_matrix(&shape))?;
        let problems = [
            (codes.dtype() != DType::U32).then(|| format!("codes are {:?}, not U32", codes.dtype())),
            (rows.dtype() != DType::F32 || cols.dtype() != DType::F32).then(|| "norms are not F32".to_string()),
            (codes.dims()[0] != map.num_words(shape.num_elements()))
                .then(|| format!("{} code words for {shape:?}, expected {}", codes.dims()[0], map.num_words(shape.num_elements()))),
            (rows.dims()[0] != num_rows || cols.dims()[0] != num_cols).then(|| {
                format!("norms of {} rows and {} columns for a {num_rows} × {num_cols} matrix", rows.dims()[0], cols.dims()[0])
            }),
        ];
        match problems.into_iter().flatten().next() {
            Some(reason) => Err(QuantError::Inconsistent { reason }),
            None => Ok(Self { codes, rows, cols, shape, map }),
        }
    }

    /// The packed codes and the row and column norms, consumed.
    pub fn into_parts(self) -> (Tensor<1, Int>, Tensor<1>, Tensor<1>) {
        (self.codes, self.rows, self.cols)
    }

    /// Decodes into a tensor of the original shape (through the host);
    /// [`QuantError::Inconsistent`] when `D` is not the original rank.
    pub fn dequantize<const D: usize>(&self) -> Result<Tensor<D>, QuantError> {
        if self.shape.num_dims() != D {
            return Err(QuantError::Inconsistent {
                reason: format!("asked for rank {D}, the tensor has rank {}", self.shape.num_dims()),
            });
        }
        Ok(self.dequantize_flat().reshape(self.shape.clone()))
    }

    /// Decodes into a flat tensor (through the host).
    pub fn dequantize_flat(&self) -> Tensor<1> {
        let words = self.codes.clone().into_data().convert::<u32>().try_to_vec::<u32>().expect("u32 codes");
        let values = host::rank1_dequantize(&words, &self.row_norms(), &self.col_norms(), self.map)
            .expect("the parts were checked to agree");
        upload(values, &self.device())
    }

    /// The codes, one byte per element (reads them back to the host).
    pub fn unpacked_codes(&self) -> Vec<u8> {
        let words = self.codes.clone().into_data();
        host::unpack(words.as_slice::<u32>().expect("codes are u32"), self.map, self.len())
    }

    /// The largest magnitude of each row (reads them back to the host).
    pub fn row_norms(&self) -> Vec<f32> {
        self.rows.clone().into_data().try_to_vec::<f32>().expect("f32 norms")
    }

    /// The largest magnitude of each column (reads them back to the host).
    pub fn col_norms(&self) -> Vec<f32> {
        self.cols.clone().into_data().try_to_vec::<f32>().expect("f32 norms")
    }

    /// The packed codes.
    pub fn codes(&self) -> &Tensor<1, Int> {
        &self.codes
    }

    /// Moves the quantized tensor to another device.
    pub fn to_device(self, device: &Device) -> Self {
        Self {
            codes: self.codes.to_device(device),
            rows: self.rows.to_device(device),
            cols: self.cols.to_device(device),
            ..self
        }
    }

    /// The shape of the tensor that was quantized.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.num_elements()
    }

    /// Whether the tensor has no elements (never: a rank-1 state has a matrix).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The code map.
    pub fn map(&self) -> MapKind {
        self.map
    }

    /// The device the codes live on.
    pub fn device(&self) -> Device {
        self.codes.device()
    }

    /// Bytes of device memory held: 4 per code word plus 4 per row and per column.
    pub fn size_bytes(&self) -> usize {
        let (rows, cols) = Self::matrix(&self.shape).expect("a matrix");
        4 * self.map.num_words(self.len()) + 4 * (rows + cols)
    }
}

fn upload(values: Vec<f32>, device: &Device) -> Tensor<1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), (device, DType::F32))
}

fn not_a_matrix(shape: &Shape) -> QuantError {
    QuantError::Inconsistent { reason: format!("rank-1 normalisation takes a tensor of rank ≥ 2 with elements, not {shape:?}") }
}
