"""memba_vision: Memba fine-tuning of vision Mamba backbones on OpenMMLab.

Install (CPU or GPU):   pip install --no-build-isolation -e .[dev]
The CUDA kernels are built as extensions when MEMBA_CUDA_EXT allows it: the fused
LIM (kernels/lim -> ``memba_vision._lim_cuda``) and the token-major selective scan
and depthwise conv (kernels/scan -> ``memba_vision._scan_cuda``):
  MEMBA_CUDA_EXT=auto (default)  build when a CUDA toolkit, a CUDA PyTorch and a
                                 target GPU (visible, or TORCH_CUDA_ARCH_LIST) exist;
                                 otherwise skip with one line
  MEMBA_CUDA_EXT=1               build or fail loudly
  MEMBA_CUDA_EXT=0               never build
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version():
    scope = {}
    with open(os.path.join(HERE, 'memba_vision', 'version.py')) as f:
        exec(f.read(), scope)  # our own version file, not user data
    return scope['__version__']


def _mmcv_requirement():
    """Prefer an installed full mmcv; otherwise require mmcv-lite (same import name)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        try:
            version('mmcv')
            return 'mmcv>=2.0.0,<2.4.0'
        except PackageNotFoundError:
            return 'mmcv-lite>=2.0.0,<2.4.0'
    except ImportError:  # pragma: no cover
        return 'mmcv-lite>=2.0.0,<2.4.0'


_EXTENSIONS = {'memba_vision._lim_cuda': 'lim', 'memba_vision._scan_cuda': 'scan'}


def cuda_extensions():
    """Returns ([ext_modules], {cmdclass}) for the CUDA kernels, or ([], {})."""
    mode = os.environ.get('MEMBA_CUDA_EXT', 'auto').strip().lower()
    if mode not in ('auto', '1', '0'):
        raise SystemExit(f'MEMBA_CUDA_EXT must be auto, 1 or 0, got {mode!r}')
    if mode == '0':
        print('memba_vision: MEMBA_CUDA_EXT=0, the CUDA extensions are not built')
        return [], {}

    def skip(reason):
        if mode == '1':
            raise SystemExit(f'memba_vision: MEMBA_CUDA_EXT=1 but the CUDA extensions '
                             f'cannot be built: {reason}')
        print(f'memba_vision: CUDA extensions skipped ({reason}); '
              'the mamba-ssm scan and the PyTorch references are used instead')
        return [], {}

    sources = {name: sorted(glob.glob(os.path.join('kernels', folder, '*.cpp')) +
                            glob.glob(os.path.join('kernels', folder, '*.cu')))
               for name, folder in _EXTENSIONS.items()}
    if not all(sources.values()):
        return skip('kernel sources missing under kernels/')
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip('PyTorch is not importable in the build environment; '
                    'install with pip install --no-build-isolation')
    if torch.version.cuda is None:
        return skip('PyTorch has no CUDA support')
    if CUDA_HOME is None:
        return skip('no CUDA toolkit (nvcc) found')
    if not os.environ.get('TORCH_CUDA_ARCH_LIST'):
        if not torch.cuda.is_available():
            return skip('no GPU visible and TORCH_CUDA_ARCH_LIST not set')
        archs = sorted({'{}.{}'.format(*torch.cuda.get_device_capability(i))
                        for i in range(torch.cuda.device_count())})
        os.environ['TORCH_CUDA_ARCH_LIST'] = ';'.join(archs)
    print(f"memba_vision: building the CUDA extensions for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    exts = [CUDAExtension(
        name=name,
        sources=srcs,
        # no -std flag: BuildExtension picks the standard the installed torch needs
        extra_compile_args={'cxx': ['-O3'],
                            'nvcc': ['-O3', '--use_fast_math',
                                     '-U__CUDA_NO_HALF_OPERATORS__',
                                     '-U__CUDA_NO_BFLOAT16_CONVERSIONS__']})
        for name, srcs in sources.items()]
    return exts, {'build_ext': BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name='memba_vision',
    version=read_version(),
    description='Memba (membrane-driven PEFT) for vision Mamba backbones on OpenMMLab',
    long_description=open(os.path.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['memba_vision', 'memba_vision.*']),
    package_data={'memba_vision.evaluation': ['data/*.csv', 'data/*.md']},  # published numbers
    python_requires='>=3.9',
    install_requires=[
        'torch',
        'torchvision',
        'mmengine>=0.10.0,<0.11.0',
        _mmcv_requirement(),
        'mmpretrain>=1.2.0,<1.3.0',
        'numpy',
        'pillow',
    ],
    extras_require={
        'cuda': ['mamba-ssm'],
        # reading tfds data needs TensorFlow too; the CPU build is enough (and smaller)
        'data': ['tensorflow-datasets>=4.9.3',
                 'tensorflow-cpu>=2.16; platform_system == "Linux" and '
                 'platform_machine == "x86_64"',
                 'tensorflow>=2.16; platform_system != "Linux" or '
                 'platform_machine != "x86_64"'],
        'dev': ['pytest'],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
