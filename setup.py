"""rbd_migration: RBD image live-migration as a ceph-mgr module.

On a Ceph host the runtime dependencies come from the distribution, for the
interpreter that ceph-mgr embeds (Debian: python3-requests, python3-boto3,
python3-jsonschema, python3-zstandard, python3-libnbd for nbd sources, and
libdeflate0, which decodes compressed qcow2 clusters and VMDK grains about
twice as fast as zlib, used when present; python3-rados and python3-rbd come
with Ceph).  ``install_requires`` names the Python ones for completeness.

The ``rbd-migration`` console script (package ``rbd_migration_cli``) is a
drop-in for ``rbd migration prepare|execute|commit|abort`` that runs them
through the module; it needs only python3-rados, on the client host.
"""
from setuptools import find_packages, setup

setup(
    name='rbd_migration',
    version='0.1.0',
    description='RBD image live-migration and disk import as a Ceph Manager module',
    long_description=open('README.rst').read(),
    long_description_content_type='text/x-rst',
    license='LGPL-2.1-or-later',
    packages=find_packages(include=['rbd_migration', 'rbd_migration.*',
                                    'rbd_migration_cli']),
    entry_points={'console_scripts': ['rbd-migration = rbd_migration_cli.main:main']},
    python_requires='>=3.9',
    install_requires=['requests', 'boto3', 'jsonschema'],
    extras_require={'zstd': ['zstandard']},
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: System :: Filesystems',
    ],
)
